"""Tokenized samples kept in memory-mapped files, so a large dataset never has to fit in RAM.

Samples are appended batch by batch while a dataset is tokenized (only one batch is in memory at a
time) and read back as slices of two flat int32 arrays, ``tokens`` and ``labels``, plus an offsets array.
The files live in a temporary folder removed when the store is garbage collected or the process exits.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref

import numpy as np


class TokenStore:
    """Append-then-read storage of variable-length (tokens, labels) samples."""

    def __init__(self, cache_dir: str | None = None, with_labels: bool = True):
        self.dir = tempfile.mkdtemp(prefix="torchft-tokens-", dir=cache_dir)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        # Without labels (text completion: labels equal tokens) only the tokens are written.
        self.with_labels = with_labels
        names = ("tokens", "labels") if with_labels else ("tokens",)
        self._files = {name: open(os.path.join(self.dir, f"{name}.bin"), "wb") for name in names}
        self._lengths: list[np.ndarray] = []
        self.offsets: np.ndarray | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def append(self, tokens: list[list[int]], labels: list[list[int]] | None = None) -> None:
        """Add a batch of samples (lists of ints or int arrays); ``labels=None``: labels equal tokens."""
        if (labels is None) == self.with_labels:
            raise ValueError("this token store was made with_labels=%s" % self.with_labels)
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        flat = self._flatten(tokens, int(lengths.sum()))
        flat.tofile(self._files["tokens"])
        if labels is not None:
            self._flatten(labels, len(flat)).tofile(self._files["labels"])
        self._lengths.append(lengths)

    @staticmethod
    def _flatten(rows, total: int) -> np.ndarray:
        # Samples arrive as numpy arrays (fast tokenizer path) or as lists of ints.
        if rows and isinstance(rows[0], np.ndarray):
            return np.concatenate(rows).astype(np.int32, copy=False)
        return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total)

    def finish(self) -> "TokenStore":
        """Close the files and map them for reading."""
        for f in self._files.values():
            f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self._lengths = []
        self._open()
        return self

    def _open(self):
        for name in ("tokens", "labels") if self.with_labels else ("tokens",):
            path = os.path.join(self.dir, f"{name}.bin")
            # np.memmap refuses empty files; an empty store reads as empty arrays.
            size = os.path.getsize(path)
            self._arrays[name] = np.memmap(path, dtype=np.int32, mode="r") if size else np.zeros(0, np.int32)
        if not self.with_labels:
            self._arrays["labels"] = self._arrays["tokens"]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self._arrays["tokens"][start:end], self._arrays["labels"][start:end]

    def span(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and labels of samples ``start..end-1``, concatenated."""
        a, b = self.offsets[start], self.offsets[end]
        return self._arrays["tokens"][a:b], self._arrays["labels"][a:b]

    # DataLoader workers started with "spawn" receive a pickled dataset: send the folder, not the data.
    def __getstate__(self):
        return {"dir": self.dir, "offsets": self.offsets, "with_labels": self.with_labels}

    def __setstate__(self, state):
        self.dir, self.offsets, self.with_labels = state["dir"], state["offsets"], state["with_labels"]
        self._arrays, self._finalizer = {}, None
        self._open()
