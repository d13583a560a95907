"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""
from __future__ import annotations

import torch


def validate_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise one clear ``ValueError`` for a sampling setting outside its range."""
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k ({top_k}) must be >= 1 or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] or None")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: [b, vocab] scores of the next token.
        temperature: 0 picks the arg-max (greedy); otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens before sampling.
        top_p: keep the smallest set of most likely tokens whose probability mass reaches top_p.
        generator: random source for sampling (seeded for reproducible output).

    Returns:
        [b] long tensor of token ids.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: a token is dropped when the tokens ahead of it already
        # reach top_p, so the most likely token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
