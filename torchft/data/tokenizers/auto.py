"""The tokenizer a model folder brings: ``model_tokenizer(checkpoint_dir)``.

A Hugging Face folder is read in this order, so the folder's own chat template is used whenever it has one:

1. ``tokenizer.json`` (+ ``tokenizer_config.json``): :func:`hf_tokenizer`, chats through the folder's template;
2. ``tokenizer.model``, then ``original/tokenizer.model``: Meta's files, a tiktoken ranks file
   (:func:`llama3_tokenizer`, Llama 3 chat format) or a sentencepiece model (:func:`llama2_tokenizer`,
   Llama 2 chat format), told apart by their content.

A path to one of these files loads that file.
"""
from __future__ import annotations

import os

from torchft.data.tokenizers._base import BaseTokenizer

# Where a model folder keeps its tokenizer, in the order they are tried.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", os.path.join("original", "tokenizer.model"))


def _is_tiktoken_ranks(path: str) -> bool:
    """A tiktoken ranks file is text: its first line is ``<base64 token> <rank>``."""
    from torchft.data.tokenizers.llama3 import _RANK_LINE

    with open(path, "rb") as f:
        first_line = f.readline().rstrip(b"\r\n")
    return bool(_RANK_LINE.match(first_line))


def _load_file(path: str, max_seq_len: int | None) -> BaseTokenizer:
    if os.path.basename(path) == "tokenizer.json":
        from torchft.data.tokenizers.hf import hf_tokenizer

        return hf_tokenizer(os.path.dirname(path) or ".", max_seq_len=max_seq_len)
    if _is_tiktoken_ranks(path):
        from torchft.data.tokenizers.llama3 import llama3_tokenizer

        return llama3_tokenizer(path, max_seq_len=max_seq_len)
    from torchft.data.tokenizers.llama2 import llama2_tokenizer

    return llama2_tokenizer(path, max_seq_len=max_seq_len)


def model_tokenizer(path: str, max_seq_len: int | None = None) -> BaseTokenizer:
    """The tokenizer of a model folder (or of one tokenizer file), with the chat format that goes with it.

    Args:
        path: a model folder (``checkpoint_dir``), or a ``tokenizer.json`` / ``tokenizer.model`` file.
        max_seq_len: truncate tokenized chats to this length.
    """
    path = str(path)
    if os.path.isfile(path):
        return _load_file(path, max_seq_len)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist (give a model folder or a tokenizer file)")
    for name in TOKENIZER_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return _load_file(candidate, max_seq_len)
    raise FileNotFoundError(
        f"{path}: no tokenizer in this folder (looked for {', '.join(TOKENIZER_FILES)}); "
        "set tokenizer.path to a folder or file that has one"
    )
