"""Sample packing: several tokenized samples share one sequence of exactly ``max_seq_len`` tokens.

A pack holds consecutive samples (documents) followed by padding. Each pack carries
``input_pos`` (positions restart at 0 for every document, so RoPE sees each document as if alone) and
``document_ids`` (which document each position belongs to; padding is one more document), from which the
collate builds a block-causal mask: a token attends only to earlier tokens of its own document. The first
label of every document is -100, so no token is trained to predict across a document boundary; the loss
of a pack therefore equals the loss of its documents run one by one.

Packs are computed from the sample lengths only; tokens stay in the memory-mapped token store and are
read when a pack is requested, so RAM does not grow with the dataset.
"""
from __future__ import annotations

import numpy as np
import torch

from torchft.data.collate import IGNORE_INDEX  # labels not trained on


def greedy_pack_boundaries(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Start index of each pack (plus a final end index): consecutive samples while they fit."""
    starts = [0]
    used = 0
    for i, length in enumerate(lengths.tolist()):
        if length > max_seq_len:
            raise ValueError(f"sample {i} has {length} tokens, more than max_seq_len={max_seq_len}")
        if used + length > max_seq_len:
            starts.append(i)
            used = 0
        used += length
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


class PackedDataset(torch.utils.data.Dataset):
    """Packs of ``max_seq_len`` tokens over a :class:`~torchft.data.token_store.TokenStore`.

    Items: ``{"tokens", "labels", "input_pos", "document_ids"}``, each a long tensor of shape [max_seq_len],
    and ``num_tokens``, a [] long tensor: the pack's tokens that are not padding.
    """

    packed = True

    def __init__(self, store, max_seq_len: int, pad_id: int, stats: dict | None = None):
        self.store, self.max_seq_len, self.pad_id = store, max_seq_len, pad_id
        self.boundaries = greedy_pack_boundaries(store.lengths, max_seq_len)
        self.stats = dict(stats or {})
        self.stats["packs"] = len(self)
        if len(self):
            self.stats["pack_fill"] = float(store.offsets[-1]) / (len(self) * max_seq_len)

    def __len__(self) -> int:
        return len(self.boundaries) - 1

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} out of range ({len(self)} packs)")
        first, last = int(self.boundaries[i]), int(self.boundaries[i + 1])
        tokens, labels = self.store.span(first, last)
        doc_lengths = np.diff(self.store.offsets[first : last + 1] - self.store.offsets[first])
        used, size = len(tokens), self.max_seq_len
        pad = size - used

        out_tokens = np.full(size, self.pad_id, dtype=np.int64)
        out_tokens[:used] = tokens
        out_labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
        out_labels[:used] = labels
        doc_starts = np.concatenate(([0], np.cumsum(doc_lengths)[:-1]))
        out_labels[doc_starts] = IGNORE_INDEX  # nothing predicts a document's first token

        # Positions restart at each document: position = index - start of its document. [size]
        all_lengths = np.append(doc_lengths, pad) if pad else doc_lengths
        document_ids = np.repeat(np.arange(len(all_lengths)), all_lengths)
        starts = np.concatenate(([0], np.cumsum(all_lengths)[:-1]))
        input_pos = np.arange(size) - starts[document_ids]
        return {
            "tokens": torch.from_numpy(out_tokens),
            "labels": torch.from_numpy(out_labels),
            "input_pos": torch.from_numpy(input_pos.astype(np.int64)),
            "document_ids": torch.from_numpy(document_ids.astype(np.int64)),
            "num_tokens": torch.tensor(used, dtype=torch.long),
        }


def pack_dataset(dataset, pad_id: int, max_seq_len: int | None = None) -> PackedDataset:
    """Pack an unpacked torchft dataset (as built with ``packed=False``); ``pad_id`` from the tokenizer."""
    max_seq_len = max_seq_len or dataset.max_seq_len
    if max_seq_len is None:
        raise ValueError("packing needs max_seq_len")
    return PackedDataset(dataset.store, max_seq_len, pad_id, dataset.stats)
