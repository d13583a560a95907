"""Tokenizers: Llama 3 (tiktoken), Llama 2 (sentencepiece) and HF ``tokenizer.json`` folders.

Every tokenizer offers the same interface, which recipes, generation and evaluation code against:

``encode(text, add_bos=True, add_eos=True) -> list[int]``
    Plain text to ids. BOS/EOS are added here and nowhere else (never two BOS); BOS only where the model's
    own tokenizer adds one (``adds_bos``: always for Llama 2/3, the post-processor's choice for an HF
    ``tokenizer.json``). Special-token strings in ``text`` are encoded as ordinary text, never as control
    tokens; control tokens come only from a chat format's own structure.
``encode_batch(texts, add_bos=True, add_eos=True) -> list[list[int]]``
    The same over many texts, in parallel where the backend allows.
``decode(ids, skip_special_tokens=True) -> str``
``tokenize_messages(messages, add_eos=True, *, add_generation_prompt=False, truncate=True) -> (tokens, mask)``
    A conversation (list of :class:`torchft.data.Message` or role/content dicts) in the model's chat
    format. ``mask[i]`` is True where token i is not trained on (a masked message, BOS). ``add_eos=False``
    leaves the last turn open; ``add_generation_prompt=True`` closes it and appends the assistant header.
    Output is truncated to ``max_seq_len`` when that is set and ``truncate`` is True.
``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``max_seq_len``, ``adds_bos``
``stop_tokens``: ids that end generation, from the chat format (Llama 3: ``<|eot_id|>``, ``<|end_of_text|>``).

Builders: :func:`llama3_tokenizer`, :func:`llama2_tokenizer`, :func:`hf_tokenizer`,
:func:`model_tokenizer` (whichever of these a model folder's own files call for), and
:func:`quickstart_tokenizer` (the small Llama-3-format tokenizer shipped for the quickstart).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "llama3_tokenizer": "torchft.data.tokenizers.llama3",
    "Llama3Tokenizer": "torchft.data.tokenizers.llama3",
    "llama2_tokenizer": "torchft.data.tokenizers.llama2",
    "Llama2Tokenizer": "torchft.data.tokenizers.llama2",
    "hf_tokenizer": "torchft.data.tokenizers.hf",
    "HFTokenizer": "torchft.data.tokenizers.hf",
    "model_tokenizer": "torchft.data.tokenizers.auto",
    "train_llama3_ranks": "torchft.data.tokenizers.bpe",
    "quickstart_tokenizer": "torchft.data._assets",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy: importing torchft.data.tokenizers does not import tiktoken, sentencepiece or tokenizers.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
