"""Train a small Llama-3-format BPE (a tiktoken ranks file) from text.

Used to build the quickstart tokenizer shipped in ``torchft/data/assets`` and the benchmark's vocabulary.
The ``tokenizers`` package trains byte-level BPE merges with the Llama 3 pre-tokenizer pattern; the merges
are then written as tiktoken ranks: the 256 single bytes first (rank = byte value), then one rank per merge
in the order it was learned, which is the order tiktoken applies them.
"""
from __future__ import annotations

import json
from typing import Iterable

from torchft.data.tokenizers.llama3 import LLAMA3_PATTERN, write_ranks


def byte_level_chars() -> list[str]:
    """The printable character byte-level BPE writes for each byte value (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _byte_level_alphabet() -> dict[str, int]:
    """Map the printable characters byte-level BPE uses for each byte back to the byte value."""
    return {c: b for b, c in enumerate(byte_level_chars())}


def train_llama3_ranks(texts: Iterable[str], num_merges: int, path: str | None = None) -> dict[bytes, int]:
    """Learn ``num_merges`` BPE merges from ``texts``; returns (and optionally writes) tiktoken ranks.

    The result has ``256 + num_merges`` ranks at most (fewer when the text runs out of pairs to merge).
    Training is deterministic for a given text.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges, initial_alphabet=alphabet, show_progress=False, min_frequency=2
    )
    tokenizer.train_from_iterator(texts, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    to_byte = _byte_level_alphabet()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(to_byte[c] for c in left + right)
        if token not in ranks:
            ranks[token] = len(ranks)
    if path is not None:
        write_ranks(ranks, path)
    return ranks
