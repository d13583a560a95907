"""Files shipped in ``torchft/data/assets`` (see ``generate_quickstart.py`` there) and loaders for them."""
from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
QUICKSTART_TOKENIZER = "quickstart_tokenizer.model"
QUICKSTART_SPLITS = {"train": "quickstart_train.jsonl", "validation": "quickstart_validation.jsonl"}
QUICKSTART_PREFERENCE_SPLITS = {"train": "quickstart_preference_train.jsonl",
                                "validation": "quickstart_preference_validation.jsonl"}


def assets_path(name: str) -> str:
    """Absolute path of a shipped asset, e.g. ``assets_path("quickstart_tokenizer.model")``."""
    path = os.path.join(ASSETS_DIR, name)
    if not os.path.isfile(path):
        available = sorted(f for f in os.listdir(ASSETS_DIR) if not f.endswith(".py"))
        raise FileNotFoundError(f"no asset named {name!r}; available: {', '.join(available)}")
    return path


def quickstart_tokenizer(path: str | None = None, max_seq_len: int | None = None):
    """The quickstart's Llama-3-format tokenizer (vocab_size 1024); ``path`` overrides the shipped file."""
    from torchft.data.tokenizers.llama3 import llama3_tokenizer

    return llama3_tokenizer(path or assets_path(QUICKSTART_TOKENIZER), max_seq_len=max_seq_len)


def quickstart_dataset(tokenizer, split: str = "train", **kwargs):
    """The quickstart's generated instruct tasks (4000 train / 200 validation rows) as an instruct dataset.

    ``kwargs`` go to :func:`torchft.data.instruct_dataset` (``packed``, ``max_seq_len``, ``train_on_input``...).
    """
    from torchft.data.datasets import instruct_dataset

    if split not in QUICKSTART_SPLITS:
        raise ValueError(f"quickstart split {split!r} is not one of {', '.join(QUICKSTART_SPLITS)}")
    return instruct_dataset(tokenizer, source="json", data_files=assets_path(QUICKSTART_SPLITS[split]), split=split, **kwargs)


def quickstart_preference_dataset(tokenizer, split: str = "train", **kwargs):
    """The quickstart's preference pairs (1000 train / 100 validation): each task's correct answer chosen
    over a wrong one. ``kwargs`` go to :func:`torchft.data.preference.preference_dataset`."""
    from torchft.data.preference import preference_dataset

    if split not in QUICKSTART_PREFERENCE_SPLITS:
        raise ValueError(f"quickstart split {split!r} is not one of {', '.join(QUICKSTART_PREFERENCE_SPLITS)}")
    return preference_dataset(tokenizer, source="json", data_files=assets_path(QUICKSTART_PREFERENCE_SPLITS[split]),
                              **kwargs)
