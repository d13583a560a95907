"""The tokenizer part of a GGUF file: tokens, token types, merges or scores, special ids, chat template.

llama.cpp's keys: ``tokenizer.ggml.model`` is ``gpt2`` (byte-level BPE; tokens spelled in the byte-level
alphabet, merges as ``"left right"``) or ``llama`` (sentencepiece; pieces with scores). Token types:
1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused (padding up to the model's vocabulary), 6 byte.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


@dataclass
class GGUFVocab:
    """What a GGUF file says about its tokenizer."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    bos_id: int
    eos_id: int
    chat_template: str
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    pad_id: int | None = None
    unk_id: int | None = None

    def pad_to(self, vocab_size: int, where: Path) -> None:
        """Unused placeholder tokens up to the model's vocabulary size (llama.cpp needs one per row)."""
        if len(self.tokens) > vocab_size:
            raise ValueError(f"{where}: the tokenizer has {len(self.tokens)} tokens, more than the model's "
                             f"vocab_size ({vocab_size})")
        for i in range(len(self.tokens), vocab_size):
            self.tokens.append(f"[PAD{i}]")
            self.types.append(UNUSED)
            if self.scores is not None:
                self.scores.append(-1000.0)

    def __call__(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.model == "gpt2":
            writer.add_tokenizer_pre("llama-bpe")  # the Llama 3 split pattern
            writer.add_token_merges(self.merges)
        else:
            writer.add_tokenizer_pre("default")
            writer.add_token_scores(self.scores)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(self.chat_template)


def _llama3_vocab(tokenizer) -> GGUFVocab:
    from torchft.data.tokenizers.bpe import byte_level_chars
    from torchft.data.tokenizers.hf_files import LLAMA3_CHAT_TEMPLATE, tiktoken_merges
    from torchft.data.tokenizers.llama3 import SPECIAL_TOKENS, load_ranks

    chars = byte_level_chars()
    ranks = load_ranks(tokenizer.path)
    spell = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    tokens = [spell(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])] + list(SPECIAL_TOKENS)
    types = [NORMAL] * len(ranks) + [CONTROL] * len(SPECIAL_TOKENS)
    merges = [f"{spell(a)} {spell(b)}" for a, b in tiktoken_merges(ranks)]
    return GGUFVocab("gpt2", tokens, types, tokenizer.bos_id, tokenizer.eos_id, LLAMA3_CHAT_TEMPLATE, merges,
                     pad_id=tokenizer.pad_id)


def _llama2_vocab(tokenizer) -> GGUFVocab:
    from torchft.data.tokenizers.hf_files import LLAMA2_CHAT_TEMPLATE, _sentencepiece_proto

    pieces = _sentencepiece_proto(tokenizer.path).pieces
    sp = tokenizer.sp_model
    return GGUFVocab("llama", [p.piece for p in pieces], [int(p.type) for p in pieces], tokenizer.bos_id,
                     tokenizer.eos_id, LLAMA2_CHAT_TEMPLATE, scores=[p.score for p in pieces], unk_id=sp.unk_id())


def _hf_json_vocab(folder: Path) -> GGUFVocab:
    """A byte-level BPE ``tokenizer.json`` (Llama 3 HF folders) as ``gpt2``."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise ValueError(f"{path}: only byte-level BPE tokenizer.json files (Llama 3) export; "
                         "for a sentencepiece model keep its tokenizer.model in the folder")
    vocab = dict(model["vocab"])
    specials = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            specials.add(added["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for text, index in vocab.items():
        tokens[index] = text
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    types = [CONTROL if i in specials else NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    text = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
    ids = {name: vocab.get(text(config.get(name))) for name in ("bos_token", "eos_token", "pad_token")}
    if ids["bos_token"] is None or ids["eos_token"] is None:
        raise ValueError(f"{config_path}: bos_token and eos_token must name tokens of tokenizer.json")
    template = config.get("chat_template") or ""
    return GGUFVocab("gpt2", tokens, types, ids["bos_token"], ids["eos_token"], template, merges,
                     pad_id=ids["pad_token"])


def write_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer of a model folder: Meta's ``tokenizer.model`` when there is one, else ``tokenizer.json``."""
    from torchft.data.tokenizers.auto import _load_file
    from torchft.data.tokenizers.llama3 import Llama3Tokenizer

    meta = next((folder / n for n in ("tokenizer.model", "original/tokenizer.model") if (folder / n).is_file()), None)
    if meta is not None:
        tokenizer = _load_file(str(meta), None)
        vocab = _llama3_vocab(tokenizer) if isinstance(tokenizer, Llama3Tokenizer) else _llama2_vocab(tokenizer)
    elif (folder / "tokenizer.json").is_file():
        vocab = _hf_json_vocab(folder)
    else:
        raise ValueError(f"{folder}: no tokenizer files (tokenizer.model, original/tokenizer.model or "
                         "tokenizer.json); a GGUF file carries its tokenizer")
    vocab.pad_to(vocab_size, folder)
    return vocab
