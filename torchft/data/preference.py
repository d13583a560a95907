"""Preference data: a prompt with a chosen and a rejected answer, for DPO / IPO / SimPO.

    dataset:
      _component_: torchft.data.preference_dataset
      source: json
      data_files: pairs.jsonl      # columns prompt, chosen, rejected

Each of ``prompt``, ``chosen`` and ``rejected`` is either text or a list of chat messages
(``[{"role": "user", "content": ...}]``, the openai shape; ``chosen`` / ``rejected`` then hold the answer's
assistant turns). Text becomes a user turn (the prompt) or an assistant turn (an answer). The prompt with
each answer goes through the tokenizer's chat format; the prompt's tokens are labelled -100, so only the
answers' tokens carry a log-probability.

Truncation (``max_seq_len``, from the dataset or the tokenizer), applied to each pair alike:

1. with ``max_prompt_len`` set, a longer prompt keeps its last ``max_prompt_len`` tokens (the end of a
   prompt, the question, matters most; its start is usually a system prompt or earlier turns);
2. a pair whose prompt alone leaves no room for an answer token (``len(prompt) >= max_seq_len``) is
   skipped; the skipped pairs are counted in one log line and in ``dataset.stats["skipped_long_prompt"]``;
3. each answer keeps its first ``max_seq_len - len(prompt)`` tokens (the start of an answer decides which
   one is better; a cut answer loses its end-of-turn token).

A sample is ``{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}`` (lists of ints,
labels aligned with the tokens as in :mod:`torchft.data.datasets`) and ``index``, its place in the dataset. :func:`preference_collate` stacks a
batch of ``b`` pairs as ``2b`` rows, the chosen answers first.
"""
from __future__ import annotations

import logging

import torch

from torchft.data.collate import IGNORE_INDEX, padded_collate
from torchft.data.messages import Message
from torchft.data.sources import load_rows
from torchft.data.token_store import TokenStore

logger = logging.getLogger("torchft.data")

_SIDES = ("chosen", "rejected")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs (see the module docstring); ``stats`` counts what truncation did."""

    packed = False

    def __init__(self, stores: dict[str, TokenStore], stats: dict):
        self.stores, self.stats = stores, stats

    def __len__(self) -> int:
        return len(self.stores["chosen"])

    def __getitem__(self, i: int) -> dict:
        sample = {"index": i}  # the pair's place in the dataset: precomputed reference log-probs are keyed by it
        for side in _SIDES:
            tokens, labels = self.stores[side].sample(i)
            sample[f"{side}_tokens"], sample[f"{side}_labels"] = tokens.tolist(), labels.tolist()
        return sample


def _messages(value, role: str, where: str, masked: bool) -> list[Message]:
    """Text (one ``role`` turn) or a list of ``{"role", "content"}`` dicts -> Messages."""
    if isinstance(value, str):
        return [Message(role, value, masked=masked)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        out = []
        for turn in value:
            if turn.get("role") not in _ROLES or not isinstance(turn.get("content"), str):
                raise ValueError(f"{where}: a message needs a role ({', '.join(_ROLES)}) and text content, "
                                 f"got {turn!r}")
            out.append(Message(_ROLES[turn["role"]], turn["content"], masked=masked))
        return out
    raise ValueError(f"{where} must hold text or a non-empty list of chat messages, got {type(value).__name__}")


def truncate_pair(prompt: list[int], answers: dict[str, list[int]], max_seq_len: int | None,
                  max_prompt_len: int | None = None) -> tuple[list[int], dict[str, list[int]]] | None:
    """The truncation policy of the module docstring on one pair's token lists; None: skip the pair."""
    if max_prompt_len is not None and len(prompt) > max_prompt_len:
        prompt = prompt[-max_prompt_len:]
    if max_seq_len is None:
        return prompt, answers
    room = max_seq_len - len(prompt)
    if room < 1:
        return None
    return prompt, {side: answer[:room] for side, answer in answers.items()}


def _tokenize_side(tokenizer, prompt: list[Message], answer: list[Message]) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of the conversation prompt + answer in the chat format.

    The prompt includes the header that opens the assistant turn (the same for both answers), so only the
    answer's own tokens carry a log-probability.
    """
    tokens, mask = tokenizer.tokenize_messages(prompt + answer, add_eos=True, truncate=False)
    opened, _ = tokenizer.tokenize_messages(prompt, add_generation_prompt=True, truncate=False)
    if tokens[:len(opened)] == opened:
        return opened, tokens[len(opened):]
    prompt_len = next((i for i, masked in enumerate(mask) if not masked), len(tokens))  # the masked turns
    return tokens[:prompt_len], tokens[prompt_len:]


def preference_dataset(
    tokenizer,
    source: str,
    data_files=None,
    split: str = "train",
    column_map: dict | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
    max_prompt_len: int | None = None,
    cache_dir: str | None = None,
    **load_kwargs,
) -> PreferenceDataset:
    """Preference pairs from a local json/jsonl/parquet file (``source="json"``, ``data_files=...``) or a
    hub dataset name, with columns ``prompt``, ``chosen`` and ``rejected`` (``column_map`` maps these
    names to yours: ``{"prompt": "question"}``). ``system_prompt`` is put before prompts that have no
    system turn. Truncation: see the module docstring.
    """
    rows = load_rows(source, data_files, split, **load_kwargs)
    name = source if isinstance(source, str) else "dataset"
    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(column_map or {})}
    for ours, theirs in columns.items():
        if theirs not in rows.column_names:
            raise ValueError(f"{name}: column {theirs!r} not found; columns present: {', '.join(rows.column_names)} "
                             f"(a preference dataset needs prompt, chosen and rejected; map yours with "
                             f"column_map={{'{ours}': '<column>'}})")
    if max_seq_len is None:
        max_seq_len = getattr(tokenizer, "max_seq_len", None)
    stores = {side: TokenStore(cache_dir) for side in _SIDES}
    stats = {"rows": len(rows), "skipped_long_prompt": 0, "truncated": 0}
    for row, record in enumerate(rows):
        prompt = _messages(record[columns["prompt"]], "user", f"{name} row {row} column {columns['prompt']!r}",
                           masked=True)
        if system_prompt and prompt[0].role != "system":
            prompt.insert(0, Message("system", system_prompt, masked=True))
        sides = {side: _tokenize_side(tokenizer, prompt, _messages(
            record[columns[side]], "assistant", f"{name} row {row} column {columns[side]!r}", masked=False))
            for side in _SIDES}
        full = {side: len(p) + len(a) for side, (p, a) in sides.items()}
        kept = truncate_pair(sides["chosen"][0], {side: a for side, (_, a) in sides.items()}, max_seq_len,
                             max_prompt_len)
        if kept is None:
            stats["skipped_long_prompt"] += 1
            continue
        prompt_tokens, answers = kept
        stats["truncated"] += any(len(prompt_tokens) + len(answers[s]) < full[s] for s in _SIDES)
        for side in _SIDES:
            tokens = prompt_tokens + answers[side]
            stores[side].append([tokens], [[IGNORE_INDEX] * len(prompt_tokens) + answers[side]])
    for store in stores.values():
        store.finish()
    if stats["skipped_long_prompt"]:
        logger.warning("%s: skipped %d of %d pairs whose prompt alone is max_seq_len=%d tokens or longer "
                       "(set max_prompt_len to keep their prompts' ends instead)", name,
                       stats["skipped_long_prompt"], len(rows), max_seq_len)
    if stats["truncated"]:
        logger.warning("%s: cut %d of %d pairs to max_seq_len=%d (prompt end and answer starts kept)", name,
                       stats["truncated"], len(rows), max_seq_len)
    if len(stores["chosen"]) == 0:
        raise ValueError(f"{name}: no pairs left out of {len(rows)} rows ({stats['skipped_long_prompt']} with a "
                         f"prompt of max_seq_len={max_seq_len} tokens or more)")
    stats["pairs"] = len(stores["chosen"])
    return PreferenceDataset(stores, stats)


def preference_collate(batch: list[dict], pad_id: int = 0, ignore_index: int = IGNORE_INDEX) -> dict:
    """``b`` pairs -> one padded batch of ``2b`` rows: ``tokens`` / ``labels`` [2b, s] with the chosen
    answers in rows ``0..b-1`` and the rejected ones in rows ``b..2b-1`` (one forward serves both), the
    counts of :func:`~torchft.data.collate.padded_collate`, and ``num_pairs``: the pairs that carry a loss
    (both answers have a target token; a rank's masked tail copies count nothing)."""
    rows = [{"tokens": s[f"{side}_tokens"], "labels": s[f"{side}_labels"]} for side in _SIDES for s in batch]
    out = padded_collate(rows, pad_id=pad_id, ignore_index=ignore_index)
    if all("index" in s for s in batch):
        out["index"] = torch.tensor([s["index"] for s in batch])  # [b] the pairs' places in their dataset
    out["num_pairs"] = sum(all(any(t != ignore_index for t in s[f"{side}_labels"]) for side in _SIDES) for s in batch)
    return out
