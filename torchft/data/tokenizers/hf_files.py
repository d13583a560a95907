"""``tokenizer.json`` + ``tokenizer_config.json`` written from Meta's ``tokenizer.model`` files.

A folder with only Meta's tokenizer file is not a complete Hugging Face folder: ``AutoTokenizer`` has to
guess, and gets the vocabulary, BOS/EOS and chat template wrong. Every step folder therefore gets the HF
files, built here with the ``tokenizers`` package from the formats' facts:

- **Llama 3 (tiktoken ranks)**: byte-level BPE. The vocabulary is each ranked byte string spelled in the
  byte-level alphabet; the merges are recovered from the ranks (the two pieces tiktoken's own merge loop,
  limited to lower ranks, leaves for a token) and ordered by the merged token's rank, which is the order
  tiktoken applies them. ``ignore_merges`` looks a whole pre-token up first, as tiktoken does. Text is split
  with the Llama 3 pattern; the 256 special tokens follow the ranks.
- **Llama 2 (sentencepiece BPE)**: the pieces in id order, byte fallback, and merges from the pieces' scores
  (a higher-scoring merged piece merges first, as sentencepiece does). The normalizer and the splitting into
  words follow the model's own settings (dummy prefix, whitespace splitting, digits split).

Both add BOS in the post-processor, as Meta's own HF folders do, and carry the chat format torchft trains
with as the chat template, so ``apply_chat_template`` gives the ids ``tokenize_messages`` gives.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from torchft.data.tokenizers._base import BaseTokenizer

log = logging.getLogger(__name__)

# Torchft's Llama 3 chat format (Llama3Tokenizer.tokenize_messages) as a template.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Torchft's Llama 2 chat format (Llama2Tokenizer.tokenize_messages): [INST] blocks, an optional <<SYS>> block.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('user and assistant turns must alternate after an optional system message') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% set content = message['content'] | trim %}"
    "{% if loop.first and system is not none %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}"
    "{% endif %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# sentencepiece piece types (sentencepiece_model.proto).
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_BPE = 2  # TrainerSpec.model_type
_SPACE = "\u2581"  # sentencepiece's visible space


def _tiktoken_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on ``token``'s bytes, using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None  # (rank, position) of the pair merged next
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges a tiktoken ranks table implies, in the order tiktoken applies them."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _tiktoken_parts(ranks, token, rank)
        # A token that lower ranks cannot build from two pieces is only ever found whole (ignore_merges).
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def llama3_hf_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` equal to a :class:`Llama3Tokenizer` (tiktoken) on every text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from torchft.data.tokenizers.bpe import byte_level_chars
    from torchft.data.tokenizers.llama3 import LLAMA3_PATTERN, SPECIAL_TOKENS, load_ranks

    ranks = load_ranks(tokenizer.path)
    chars = byte_level_chars()

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in tiktoken_merges(ranks)]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf.post_processor = _bos_processor(processors, "<|begin_of_text|>", tokenizer.bos_id)
    return hf


def _bos_processor(processors, bos: str, bos_id: int):
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])


def _sentencepiece_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != _SP_BPE:
        raise ValueError(f"{path}: only BPE sentencepiece models (Llama 2's kind) convert to tokenizer.json")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: sentencepiece models with treat_whitespace_as_suffix do not convert to tokenizer.json")
    return proto


def sentencepiece_merges(pieces) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE model: every split of a piece into two pieces, best merged score first."""
    mergeable = {p.piece: i for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
    found = []  # (-score of the merged piece, its id, left id): sentencepiece merges the best score first
    for piece, index in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                found.append((-pieces[index].score, index, mergeable[left], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def llama2_hf_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` equal to a :class:`Llama2Tokenizer` (sentencepiece BPE) on every text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = _sentencepiece_proto(tokenizer.path)
    pieces, spec, norm = proto.pieces, proto.trainer_spec, proto.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = pieces[spec.unk_id].piece
    hf = Tokenizer(models.BPE(
        vocab=vocab, merges=sentencepiece_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback
    ))
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    hf.pre_tokenizer = _sentencepiece_words(pre_tokenizers, Regex, spec)
    hf.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    hf.add_special_tokens([
        AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (_SP_UNKNOWN, _SP_CONTROL)
    ])
    hf.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == _SP_USER_DEFINED])
    hf.post_processor = _bos_processor(processors, pieces[tokenizer.bos_id].piece, tokenizer.bos_id)
    return hf


def _sentencepiece_words(pre_tokenizers, Regex, spec):
    """How sentencepiece cuts text into words before BPE: no piece crosses these cuts."""
    steps = []
    if spec.split_by_whitespace:
        # Each visible space starts a word; with whitespace-only pieces allowed, a run of them does.
        pattern = f"{_SPACE}*[^{_SPACE}]+|{_SPACE}+" if spec.allow_whitespace_only_pieces else f"{_SPACE}[^{_SPACE}]*|[^{_SPACE}]+"
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if spec.split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps) if steps else None


def hf_tokenizer_files(tokenizer: BaseTokenizer) -> dict[str, str]:
    """The HF tokenizer files (name -> text) for a Llama 3 or Llama 2 tokenizer built from Meta's file."""
    from torchft.data.tokenizers.llama2 import Llama2Tokenizer
    from torchft.data.tokenizers.llama3 import Llama3Tokenizer

    if isinstance(tokenizer, Llama3Tokenizer):
        hf, template = llama3_hf_tokenizer(tokenizer), LLAMA3_CHAT_TEMPLATE
        specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>"}
    elif isinstance(tokenizer, Llama2Tokenizer):
        hf, template = llama2_hf_tokenizer(tokenizer), LLAMA2_CHAT_TEMPLATE
        sp = tokenizer.sp_model
        specials = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                    "unk_token": sp.id_to_piece(sp.unk_id())}
    else:
        raise TypeError(f"HF tokenizer files are written for Llama 3 and Llama 2 tokenizers, not {type(tokenizer).__name__}")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": template,
    }
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_tokens)}
    return {
        "tokenizer.json": hf.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False),
        "generation_config.json": json.dumps(generation, indent=2),
    }


_CONVERTED: dict[str, dict[str, str]] = {}  # sha256 of a tokenizer file -> its HF files


def _converted(path: Path) -> dict[str, str]:
    """:func:`hf_tokenizer_files` of the tokenizer file at ``path``, once per distinct file (the digest of
    its bytes, wherever it lies): every save of a run writes the same files, and recovering the merges of a
    128k-token vocabulary is too slow to repeat at each save."""
    from torchft.data.tokenizers.auto import _load_file

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest not in _CONVERTED:
        _CONVERTED[digest] = hf_tokenizer_files(_load_file(str(path), None))
    return _CONVERTED[digest]


def write_hf_tokenizer_files(folder: str | Path) -> list[str]:
    """Complete a model folder that has Meta's ``tokenizer.model`` but no ``tokenizer.json``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (specials, chat template), ``special_tokens_map.json``
    and, when the folder has none, ``generation_config.json`` (stop at the end of a turn). A file already in
    the folder is kept. A tokenizer file that cannot be converted is reported in one warning line; the folder
    stays as it was. Returns the names written.
    """
    from torchft.data.tokenizers.auto import TOKENIZER_FILES

    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return []
    source = next((folder / name for name in TOKENIZER_FILES[1:] if (folder / name).is_file()), None)
    if source is None:
        return []
    try:
        files = _converted(source)
    except (ValueError, OSError, TypeError) as e:
        log.warning("%s: no tokenizer.json written (%s)", source, e)
        return []
    written = []
    for name, text in files.items():
        if not (folder / name).exists():
            (folder / name).write_text(text, encoding="utf-8")
            written.append(name)
    return written
