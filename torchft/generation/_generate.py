"""Autoregressive decoding with a fixed-size KV cache.

Every decode step has the same shapes (tokens [b, 1], input_pos [b, 1], mask [b, 1, cache_len]), so
``torch.compile`` traces the step once and reuses it for every new token. Prompts of different lengths in
one batch are padded on the left; padded slots are masked out of attention.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from torchft.generation._sampling import sample_next_token, validate_sampling_args

# Called after each step with the new tokens of every row so far; returns one flag per row, True when
# that row should stop (for example because a stop string appeared in its decoded text).
StopFn = Callable[[list[list[int]]], list[bool]]


@dataclass
class GenerationOutput:
    """New tokens per prompt (a stop token, when hit, is the last one) and how fast they came."""

    tokens: list[list[int]]
    prompt_tokens: int  # longest prompt in the batch
    new_tokens: int  # decode steps run (per row, at most max_new_tokens)
    prefill_seconds: float
    decode_seconds: float
    peak_memory_gib: float  # CUDA: peak allocated; CPU: peak resident size of the process

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over all rows, the prefill excluded (each row's first new token comes from it)."""
        decoded = sum(max(len(row) - 1, 0) for row in self.tokens)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _forward(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(tokens, input_pos=input_pos, mask=mask)


def _last_position_logits(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Logits [b, vocab] of the last position only: the prefill never builds [b, s, vocab]."""
    if hasattr(model, "hidden_states") and hasattr(model, "output"):
        hidden = model.hidden_states(tokens, input_pos=input_pos, mask=mask)  # [b, s, dim]
        return model.output(hidden[:, -1])
    return model(tokens, input_pos=input_pos, mask=mask)[:, -1]


_compiled_forward = None


def _decode_forward(compile: bool) -> Callable[..., torch.Tensor]:
    global _compiled_forward
    if not compile:
        return _forward
    if _compiled_forward is None:
        # dynamic=False: the decode step's shapes never change, so one static graph serves every token.
        _compiled_forward = torch.compile(_forward, dynamic=False)
    return _compiled_forward


def _as_batch(prompt_tokens) -> tuple[list[list[int]], bool]:
    """Normalise one prompt or a batch of prompts to a list of token lists; say whether it was one."""
    if isinstance(prompt_tokens, torch.Tensor):
        prompt_tokens = prompt_tokens.tolist()
    prompt_tokens = list(prompt_tokens)
    if len(prompt_tokens) == 0 or not isinstance(prompt_tokens[0], (list, tuple)):
        return [[int(t) for t in prompt_tokens]], True
    return [[int(t) for t in p] for p in prompt_tokens], False


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


@torch.no_grad()
def generate_with_stats(
    model: nn.Module,
    prompt_tokens: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    *,
    pad_id: int = 0,
    compile: bool = False,
    stop_fn: StopFn | None = None,
) -> GenerationOutput:
    """Like :func:`generate`, but returns a :class:`GenerationOutput` with timings and memory."""
    prompts, _ = _as_batch(prompt_tokens)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt is empty: give at least one token to generate from")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be > 0")
    validate_sampling_args(temperature, top_k, top_p)

    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    cache_len = prompt_len + max_new_tokens
    model_max = getattr(getattr(model, "args", None), "max_seq_len", None)
    if model_max is not None and cache_len > model_max:
        raise ValueError(
            f"prompt length ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {cache_len} "
            f"exceeds the model's max_seq_len ({model_max})"
        )
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop_set = set(int(t) for t in (stop_tokens or ()))

    # Left-pad to [b, prompt_len]; key_valid marks the cache slots that hold real tokens.
    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long, device=device)
    key_valid = torch.ones(batch, cache_len, dtype=torch.bool, device=device)
    pad_len = torch.tensor([prompt_len - len(p) for p in prompts], device=device)  # [b]
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = torch.tensor(prompt, device=device)
        key_valid[row, : prompt_len - len(prompt)] = False
    causal = torch.ones(cache_len, cache_len, dtype=torch.bool, device=device).tril()  # [cache_len, cache_len]
    # Every slot may see itself, so a padded query row is never fully masked (that would give NaN).
    diagonal = torch.eye(cache_len, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    model.setup_caches(batch, _model_dtype(model), max_seq_len=cache_len)
    try:
        # Prefill: the whole prompt in one call. Cache slot i holds column i; RoPE positions count from
        # each row's first real token, as they would without padding.
        start = time.perf_counter()
        columns = torch.arange(prompt_len, device=device).expand(batch, prompt_len)  # [b, s]
        input_pos = (columns - pad_len[:, None]).clamp(min=0)
        mask = causal[:prompt_len] & (key_valid[:, None, :] | diagonal[:prompt_len])  # [b, s, cache_len]
        logits = _last_position_logits(model, tokens, input_pos, mask)  # [b, vocab]
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # [b]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prefill_seconds = time.perf_counter() - start

        forward = _decode_forward(compile)
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        steps = 0
        start = time.perf_counter()
        for step in range(max_new_tokens):
            steps += 1
            for row, token in enumerate(next_token.tolist()):
                if not done[row]:
                    generated[row].append(token)
                    done[row] = token in stop_set
            if stop_fn is not None:
                done = [d or s for d, s in zip(done, stop_fn(generated))]
            if all(done) or step == max_new_tokens - 1:
                break
            slot = prompt_len + step  # cache slot of the token being fed
            input_pos = (slot - pad_len)[:, None]  # [b, 1]
            mask = (causal[slot] & key_valid)[:, None, :]  # [b, 1, cache_len]
            logits = forward(model, next_token[:, None], input_pos, mask)[:, -1]  # [b, vocab]
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        decode_seconds = time.perf_counter() - start
    finally:
        model.clear_caches()
        model.train(was_training)

    return GenerationOutput(
        tokens=generated,
        prompt_tokens=prompt_len,
        new_tokens=steps,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        peak_memory_gib=_peak_memory_gib(device),
    )


def generate(
    model: nn.Module,
    prompt_tokens: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    *,
    pad_id: int = 0,
    compile: bool = False,
    stop_fn: StopFn | None = None,
) -> list[int] | list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after a prompt with the model's KV cache.

    Args:
        model: a torchft decoder (``model(tokens, input_pos=, mask=)`` and ``setup_caches``).
        prompt_tokens: one prompt (list of ids or 1-D tensor) or a batch (list of lists or [b, s] tensor);
            prompts of different lengths are padded on the left.
        max_new_tokens: how many tokens to add at most (> 0).
        temperature: 0.0 is greedy (arg-max); > 0 samples from softmax(logits / temperature).
        top_k, top_p: optional filters applied before sampling.
        stop_tokens: ids that end a row (the stop id is kept as the row's last token).
        seed: seeds the sampler, for reproducible sampling.
        pad_id: id used for left padding (never attended to).
        compile: compile the fixed-shape decode step with ``torch.compile``.
        stop_fn: optional per-step check on the new tokens of each row (see ``StopFn``).

    Returns:
        The new tokens (prompt excluded): a list of ids for one prompt, a list of lists for a batch.

    Example::

        new_ids = generate(model, tokenizer.encode("Hello", add_eos=False), max_new_tokens=20)
    """
    _, single = _as_batch(prompt_tokens)
    out = generate_with_stats(
        model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed,
        pad_id=pad_id, compile=compile, stop_fn=stop_fn,
    )
    return out.tokens[0] if single else out.tokens
