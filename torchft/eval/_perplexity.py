"""Perplexity of a model on a token sequence (used to measure what quantization costs)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Sequence[int], *, window: int = 512) -> float:
    """exp(mean negative log-likelihood) of ``tokens[1:]``, each predicted from the tokens before it.

    The sequence is cut into consecutive windows of ``window + 1`` tokens sharing one token at each
    seam (the last of one window is the first of the next), so every token is scored exactly once
    with up to ``window`` tokens of context.
    """
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    device = next(model.parameters()).device
    ids = torch.tensor(list(tokens), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]  # [<= window + 1]
        logits = model(chunk[None, :-1]).float()  # [1, s, vocab]
        total_nll += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    model.train(was_training)
    return math.exp(total_nll / count)
