"""The Llama 3 tokenizer: a tiktoken BPE over Meta's ``tokenizer.model`` ranks file.

The file holds one ``<base64 token> <rank>`` pair per line. The 256 special tokens follow the ranks in
Meta's published order (Llama 3.1 onwards; for the 128000-rank file ``<|begin_of_text|>`` = 128000,
``<|eot_id|>`` = 128009). Any ranks file works, so small vocabularies (tests, the quickstart) load too.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tiktoken

from torchft.data.tokenizers._base import BaseTokenizer

# The pre-tokenizer pattern Llama 3 splits text with before BPE.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]

# Very long runs of whitespace (or of non-whitespace) make the regex engine recurse deeply; texts are cut
# so that no run is longer than this before encoding. Short texts skip the check entirely.
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d}|\S{%d}" % (_MAX_RUN_CHARS, _MAX_RUN_CHARS))

_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+$")


def load_ranks(path: str) -> dict[bytes, int]:
    """Read a ``<base64 token> <rank>`` file; a file of another kind is reported with its line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        if not _RANK_LINE.match(line):
            hint = " (it is a sentencepiece model: load it with llama2_tokenizer)" if _is_sentencepiece(data) else ""
            raise ValueError(
                f"{path}:{lineno}: not a Llama 3 tiktoken ranks file; expected '<base64 token> <rank>' lines{hint}"
            )
        token_b64, rank = line.split(b" ")
        try:
            token = base64.b64decode(token_b64, validate=True)
        except binascii.Error as e:
            raise ValueError(f"{path}:{lineno}: bad base64 token ({e})") from None
        ranks[token] = int(rank)
    if not ranks:
        raise ValueError(f"{path}: empty tokenizer ranks file")
    expected = set(range(len(ranks)))
    if set(ranks.values()) != expected:
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _is_sentencepiece(data: bytes) -> bool:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
        return True
    except Exception:  # sentencepiece raises RuntimeError or OSError, depending on the build
        return False


def write_ranks(ranks: dict[bytes, int], path: str) -> None:
    """Write ranks in the same format :func:`load_ranks` reads (Meta's tokenizer.model layout)."""
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def _split_long_runs(text: str) -> list[str]:
    """Cut ``text`` so no piece has a whitespace/non-whitespace run longer than ``_MAX_RUN_CHARS``."""
    pieces, start = [], 0
    for m in _LONG_RUN.finditer(text):
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]


class Llama3Tokenizer(BaseTokenizer):
    """Llama 3 tokenizer and chat format. Build it with :func:`llama3_tokenizer`.

    Chat format (one message)::

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    """

    def __init__(self, path: str, max_seq_len: int | None = None):
        ranks = load_ranks(path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.tt_model = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.path = path
        self.max_seq_len = max_seq_len
        self.vocab_size = self.num_base_tokens + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        # Generation stops at the end of a turn, or at the end of the text.
        self.stop_tokens = [self.eot_id, self.eos_id]
        self._double_newline = self._ordinary("\n\n")
        self._bos_array = np.array([self.bos_id], dtype=np.uint32)
        self._eos_array = np.array([self.eos_id], dtype=np.uint32)

    def _ordinary(self, text: str) -> list[int]:
        # Special-token strings inside text are encoded as plain text, never as control tokens.
        if len(text) <= _MAX_RUN_CHARS:
            return self.tt_model.encode_ordinary(text)
        ids: list[int] = []
        for piece in _split_long_runs(text):
            ids.extend(self.tt_model.encode_ordinary(piece))
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS added here only (never twice)."""
        return self._wrap(self._ordinary(text), add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 8):
        """``encode`` over many texts, in parallel threads (tiktoken releases the GIL)."""
        if any(len(t) > _MAX_RUN_CHARS for t in texts):
            return [self.encode(t, add_bos, add_eos) for t in texts]
        batch = self.tt_model.encode_ordinary_batch(texts, num_threads=num_threads)
        return [self._wrap(ids, add_bos, add_eos) for ids in batch]

    def encode_batch_numpy(self, texts: list[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 8):
        """``encode_batch`` returning int32 numpy arrays: no Python int per token (used to build datasets)."""

        def encode(text):
            if len(text) <= _MAX_RUN_CHARS:
                ids = self.tt_model.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            else:
                ids = np.asarray(self._ordinary(text), dtype=np.uint32)
            parts = [self._bos_array] if add_bos else []
            parts.append(ids)
            if add_eos:
                parts.append(self._eos_array)
            return np.concatenate(parts).astype(np.int32, copy=False)

        if len(texts) < 2 or num_threads <= 1:
            return [encode(t) for t in texts]
        with ThreadPoolExecutor(num_threads) as pool:  # tiktoken releases the GIL while encoding
            return list(pool.map(encode, texts))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens=False``."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self.tt_model.decode_bytes(ids).decode("utf-8", errors="replace")

    def _header(self, role: str) -> list[int]:
        return [self.start_header_id, *self._ordinary(role), self.end_header_id, *self._double_newline]

    def _tokenize_messages(self, messages, add_eos, add_generation_prompt):
        tokens, mask = [self.bos_id], [True]
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            ids = self._header(message.role) + self._ordinary(message.content.strip())
            # Only the last turn of a conversation may stay open, and not when the assistant is asked
            # to answer: the generation prompt always follows a closed turn, as in Meta's template.
            if add_eos or add_generation_prompt or not last:
                ids.append(self.eot_id)
            tokens.extend(ids)
            mask.extend([message.masked] * len(ids))
        if add_generation_prompt:
            header = self._header("assistant")
            tokens.extend(header)
            mask.extend([True] * len(header))
        return tokens, mask


def llama3_tokenizer(path: str, max_seq_len: int | None = None) -> Llama3Tokenizer:
    """Load a Llama 3 tokenizer from a tiktoken ranks file (Meta's ``original/tokenizer.model``)."""
    return Llama3Tokenizer(path, max_seq_len=max_seq_len)
