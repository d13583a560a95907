"""Dataset builders: instruct, chat and text-completion data, tokenized and ready to batch.

Every builder is a plain function taking the tokenizer first, so a config can say::

    dataset:
      _component_: torchft.data.instruct_dataset
      source: json
      data_files: my_data.jsonl

and a recipe calls ``instantiate(cfg.dataset, tokenizer=tokenizer)``.

Samples are ``{"tokens": list[int], "labels": list[int]}`` with labels ALIGNED with tokens (not shifted):
``labels[i]`` is ``tokens[i]``, or -100 where the token is not trained on. The recipe shifts (logits at
position i predict labels[i + 1]). With ``packed=True`` the builder returns a :class:`PackedDataset`.

Samples longer than ``max_seq_len`` are truncated (``long_samples="truncate"``) or dropped
(``long_samples="drop"``); samples left with nothing to train on are dropped. Every cut or drop is
counted, logged, and kept in ``dataset.stats``.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from torchft.data.messages import Message
from torchft.data.preference import preference_dataset
from torchft.data.collate import IGNORE_INDEX  # labels not trained on
from torchft.data.sources import load_rows
from torchft.data.templates import render_instruct
from torchft.data.token_store import TokenStore

logger = logging.getLogger("torchft.data")

_BATCH_ROWS = 512


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized samples, one per row: ``{"tokens": list[int], "labels": list[int]}``."""

    packed = False

    def __init__(self, store: TokenStore, stats: dict, max_seq_len: int | None):
        self.store, self.stats, self.max_seq_len = store, stats, max_seq_len

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        tokens, labels = self.store.sample(i)
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}


def _resolve_max_seq_len(tokenizer, max_seq_len):
    return max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)


def _source_name(source) -> str:
    return source if isinstance(source, str) else "dataset"


def _check_columns(rows, source, required: dict[str, str]):
    source = _source_name(source)
    present = rows.column_names
    for ours, theirs in required.items():
        if theirs not in present:
            mapped = f" (mapped from {ours!r})" if theirs != ours else ""
            raise ValueError(
                f"{source}: column {theirs!r}{mapped} not found; columns present: {', '.join(present)}"
                f" (map yours with column_map={{'{ours}': '<column>'}})"
            )


def _build(rows, source, tokenize_batch, max_seq_len, long_samples, packed, tokenizer, cache_dir, with_labels=True):
    """Tokenize ``rows`` batch by batch into a TokenStore, applying the length policy with counts."""
    if long_samples not in ("truncate", "drop"):
        raise ValueError(f"long_samples must be 'truncate' or 'drop', got {long_samples!r}")
    if packed and max_seq_len is None:
        raise ValueError("packed=True needs max_seq_len (on the dataset or the tokenizer)")
    stats = {"rows": len(rows), "truncated": 0, "dropped_too_long": 0, "dropped_nothing_to_train": 0}
    store = TokenStore(cache_dir, with_labels=with_labels)

    def finish_batch(result):
        tokens_batch, labels_batch = result
        keep_tokens, keep_labels = [], []
        for offset, tokens in enumerate(tokens_batch):
            labels = tokens if labels_batch is None else labels_batch[offset]
            if max_seq_len is not None and len(tokens) > max_seq_len:
                if long_samples == "drop":
                    stats["dropped_too_long"] += 1
                    continue
                stats["truncated"] += 1
                tokens, labels = tokens[:max_seq_len], labels[:max_seq_len]
            # labels[0] is never predicted (nothing comes before it), so it does not count as trained.
            if labels_batch is not None and all(label == IGNORE_INDEX for label in labels[1:]):
                stats["dropped_nothing_to_train"] += 1
                continue
            keep_tokens.append(tokens)
            keep_labels.append(labels)
        if keep_tokens:
            store.append(keep_tokens, None if labels_batch is None else keep_labels)

    # Tokenize the next batch in a thread while this one is stored (tiktoken releases the GIL).
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for start in range(0, len(rows), _BATCH_ROWS):
            future = pool.submit(tokenize_batch, rows[start : start + _BATCH_ROWS], start)
            if pending is not None:
                finish_batch(pending.result())
            pending = future
        if pending is not None:
            finish_batch(pending.result())
    store.finish()

    name = _source_name(source)
    if stats["truncated"]:
        logger.warning("%s: truncated %d of %d samples to max_seq_len=%d", name, stats["truncated"], len(rows), max_seq_len)
    if stats["dropped_too_long"]:
        logger.warning(
            "%s: dropped %d of %d samples longer than max_seq_len=%d", name, stats["dropped_too_long"], len(rows), max_seq_len
        )
    if stats["dropped_nothing_to_train"]:
        logger.warning(
            "%s: dropped %d of %d samples with no trained tokens (every label masked)",
            name, stats["dropped_nothing_to_train"], len(rows),
        )
    if len(store) == 0:
        raise ValueError(f"{name}: no samples left out of {len(rows)} rows ({_describe_drops(stats)})")
    stats["samples"] = len(store)
    stats["tokens"] = int(store.offsets[-1])
    if packed:
        from torchft.data.packing import PackedDataset

        return PackedDataset(store, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, stats=stats)
    return SFTDataset(store, stats, max_seq_len)


def _describe_drops(stats):
    return f"{stats['dropped_too_long']} longer than max_seq_len, {stats['dropped_nothing_to_train']} with nothing to train on"


def _labels(tokens, mask):
    return [IGNORE_INDEX if m else t for t, m in zip(tokens, mask)]


def _text(value, source, row, column) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{_source_name(source)} row {row}: column {column!r} must hold text, got {type(value).__name__}")
    return value


def instruct_dataset(
    tokenizer,
    source: str,
    data_files=None,
    split: str = "train",
    column_map: dict | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    long_samples: str = "truncate",
    cache_dir: str | None = None,
    **load_kwargs,
):
    """Instruction data with columns ``instruction``, ``input`` (optional) and ``output``.

    Each row becomes a conversation: an optional system prompt, a user turn rendered by ``template``
    (None: the instruction, a blank line and the input; ``"alpaca"``; or a format string with
    ``{instruction}`` and ``{input}``), and the ``output`` as the assistant turn, in the tokenizer's
    chat format. ``column_map`` maps these names to yours: ``{"output": "response"}``.
    ``train_on_input=False`` labels the prompt tokens -100.
    """
    rows = load_rows(source, data_files, split, **load_kwargs)
    columns = {"instruction": "instruction", "output": "output", "input": "input", **(column_map or {})}
    required = {k: columns[k] for k in ("instruction", "output")}
    if "input" in (column_map or {}):
        required["input"] = columns["input"]
    _check_columns(rows, source, required)
    input_column = columns["input"] if columns["input"] in rows.column_names else None
    max_seq_len = _resolve_max_seq_len(tokenizer, max_seq_len)

    def tokenize_batch(batch, start):
        tokens_batch, labels_batch = [], []
        for j in range(len(batch[columns["instruction"]])):
            row = start + j
            instruction = _text(batch[columns["instruction"]][j], source, row, columns["instruction"])
            inp = _text(batch[input_column][j], source, row, input_column) if input_column else ""
            output = _text(batch[columns["output"]][j], source, row, columns["output"])
            messages = [Message("system", system_prompt, masked=not train_on_input)] if system_prompt else []
            messages.append(Message("user", render_instruct(template, instruction, inp), masked=not train_on_input))
            messages.append(Message("assistant", output))
            tokens, mask = tokenizer.tokenize_messages(messages, add_eos=True, truncate=False)
            tokens_batch.append(tokens)
            labels_batch.append(_labels(tokens, mask))
        return tokens_batch, labels_batch

    return _build(rows, source, tokenize_batch, max_seq_len, long_samples, packed, tokenizer, cache_dir)


def alpaca_dataset(
    tokenizer,
    source: str = "tatsu-lab/alpaca",
    data_files=None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    **kwargs,
):
    """The Alpaca instruction dataset (hub name ``tatsu-lab/alpaca``) with the Alpaca prompt template.

    Any file with the same columns works: ``alpaca_dataset(tok, source="json", data_files="alpaca.json")``.
    """
    return instruct_dataset(
        tokenizer, source, data_files, split, template="alpaca", train_on_input=train_on_input,
        max_seq_len=max_seq_len, packed=packed, **kwargs,
    )


# Role names of the sharegpt shape ({"from", "value"}) and of the openai shape ({"role", "content"}).
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "tool": "ipython", "ipython": "ipython"}
_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}
_STYLES = {"sharegpt": ("conversations", "from", "value", _SHAREGPT_ROLES), "openai": ("messages", "role", "content", _OPENAI_ROLES)}


def chat_dataset(
    tokenizer,
    source: str,
    data_files=None,
    split: str = "train",
    conversation_style: str = "auto",
    conversation_column: str | None = None,
    system_prompt: str | None = None,
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    long_samples: str = "truncate",
    cache_dir: str | None = None,
    **load_kwargs,
):
    """Multi-turn conversations in the sharegpt or openai shape.

    sharegpt: a ``conversations`` column of ``[{"from": "human"|"gpt"|"system", "value": ...}]``;
    openai: a ``messages`` column of ``[{"role": "user"|"assistant"|"system", "content": ...}]``.
    ``conversation_style="auto"`` picks by the column present. Assistant turns are trained on; the
    others are labelled -100 unless ``train_on_input``. ``system_prompt`` is prepended to conversations
    that have no system turn.
    """
    rows = load_rows(source, data_files, split, **load_kwargs)
    source = _source_name(source)
    if conversation_style == "auto":
        found = [s for s, spec in _STYLES.items() if (conversation_column or spec[0]) in rows.column_names]
        if not found:
            raise ValueError(
                f"{source}: no 'conversations' (sharegpt) or 'messages' (openai) column; columns present: "
                f"{', '.join(rows.column_names)} (set conversation_column and conversation_style)"
            )
        conversation_style = found[0]
    if conversation_style not in _STYLES:
        raise ValueError(f"conversation_style must be 'auto', 'sharegpt' or 'openai', got {conversation_style!r}")
    default_column, role_key, content_key, roles = _STYLES[conversation_style]
    column = conversation_column or default_column
    _check_columns(rows, source, {column: column})
    max_seq_len = _resolve_max_seq_len(tokenizer, max_seq_len)

    def to_messages(turns, row):
        if not turns:
            raise ValueError(f"{source} row {row}: empty conversation")
        messages = []
        for turn in turns:
            if role_key not in turn or content_key not in turn:
                raise ValueError(f"{source} row {row}: a {conversation_style} turn needs {role_key!r} and {content_key!r}")
            role = roles.get(turn[role_key])
            if role is None:
                raise ValueError(
                    f"{source} row {row}: unknown role {turn[role_key]!r} (expected one of {', '.join(roles)})"
                )
            content = _text(turn[content_key], source, row, column)
            messages.append(Message(role, content, masked=role != "assistant" and not train_on_input))
        if system_prompt and messages[0].role != "system":
            messages.insert(0, Message("system", system_prompt, masked=not train_on_input))
        return messages

    def tokenize_batch(batch, start):
        tokens_batch, labels_batch = [], []
        for j, turns in enumerate(batch[column]):
            tokens, mask = tokenizer.tokenize_messages(to_messages(turns, start + j), add_eos=True, truncate=False)
            tokens_batch.append(tokens)
            labels_batch.append(_labels(tokens, mask))
        return tokens_batch, labels_batch

    return _build(rows, source, tokenize_batch, max_seq_len, long_samples, packed, tokenizer, cache_dir)


def text_completion_dataset(
    tokenizer,
    source: str,
    data_files=None,
    split: str = "train",
    column: str = "text",
    add_eos: bool = True,
    max_seq_len: int | None = None,
    packed: bool = False,
    long_samples: str = "truncate",
    cache_dir: str | None = None,
    **load_kwargs,
):
    """Plain text, every token trained on: BOS + text (+ EOS). ``source="text"`` reads one row per line."""
    rows = load_rows(source, data_files, split, **load_kwargs)
    _check_columns(rows, source, {column: column})
    max_seq_len = _resolve_max_seq_len(tokenizer, max_seq_len)

    def tokenize_batch(batch, start):
        texts = [t if isinstance(t, str) else _text(t, source, start + j, column) for j, t in enumerate(batch[column])]
        encode = getattr(tokenizer, "encode_batch_numpy", tokenizer.encode_batch)
        return encode(texts, add_bos=True, add_eos=add_eos), None

    return _build(rows, source, tokenize_batch, max_seq_len, long_samples, packed, tokenizer, cache_dir,
                  with_labels=False)


# The builders that hand ``source`` and ``data_files`` to ``load_rows`` as given: a recipe's start (and
# ``tune validate``) checks those two arguments with ``local_source`` before anything is loaded.
SOURCE_READERS = (instruct_dataset, alpaca_dataset, chat_dataset, text_completion_dataset, preference_dataset)
