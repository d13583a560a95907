"""Data: tokenizers, chat messages and formats, datasets, packing, collate and a resumable loader.

Names are loaded on first use, so ``import torchft.data`` stays cheap.

- Tokenizers (interface documented in :mod:`torchft.data.tokenizers`): ``llama3_tokenizer``,
  ``llama2_tokenizer``, ``hf_tokenizer``, ``quickstart_tokenizer``.
- ``Message(role, content, masked=False)``.
- Dataset builders (tokenizer first): ``instruct_dataset``, ``alpaca_dataset``, ``chat_dataset``,
  ``text_completion_dataset``, ``quickstart_dataset``; ``preference_dataset`` (prompt / chosen / rejected,
  batched by ``preference_collate``) and ``quickstart_preference_dataset``. Samples: ``{"tokens", "labels"}``, labels aligned
  with tokens (-100 = not trained on; the recipe shifts). ``packed=True`` gives ``PackedDataset``.
- ``padded_collate``, ``packed_collate``, ``block_causal_mask``; ``build_dataloader`` /
  ``ResumableDataLoader`` (``state_dict``, ``load_state_dict``, ``set_epoch``).
- ``assets_path(name)``: files shipped in ``torchft/data/assets``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Message": "torchft.data.messages",
    "llama3_tokenizer": "torchft.data.tokenizers.llama3",
    "llama2_tokenizer": "torchft.data.tokenizers.llama2",
    "hf_tokenizer": "torchft.data.tokenizers.hf",
    "quickstart_tokenizer": "torchft.data._assets",
    "quickstart_dataset": "torchft.data._assets",
    "assets_path": "torchft.data._assets",
    "instruct_dataset": "torchft.data.datasets",
    "alpaca_dataset": "torchft.data.datasets",
    "chat_dataset": "torchft.data.datasets",
    "text_completion_dataset": "torchft.data.datasets",
    "preference_dataset": "torchft.data.preference",
    "preference_collate": "torchft.data.preference",
    "quickstart_preference_dataset": "torchft.data._assets",
    "SFTDataset": "torchft.data.datasets",
    "PackedDataset": "torchft.data.packing",
    "pack_dataset": "torchft.data.packing",
    "padded_collate": "torchft.data.collate",
    "packed_collate": "torchft.data.collate",
    "block_causal_mask": "torchft.data.collate",
    "build_dataloader": "torchft.data.dataloader",
    "ResumableDataLoader": "torchft.data.dataloader",
    "load_rows": "torchft.data.sources",
    "IGNORE_INDEX": "torchft.data.collate",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
