"""Cross-entropy that never materialises the full logits, and returns a token-weighted sum.

A Llama 3 vocabulary has 128,256 entries: the logits of 4 x 2048 tokens in fp32 take 4 GiB, and a
plain ``F.cross_entropy(model(tokens).float(), ...)`` keeps several such tensors alive for backward.
:class:`ChunkedCrossEntropy` instead takes the final hidden states (``model.hidden_states()``) and
the output projection (``model.output``), and processes the target tokens a chunk at a time: each
chunk's logits are computed, its loss and its gradients (with respect to the hidden states and the
output projection's trainable weights) are taken at once, and the logits are freed. Backward then
only scales the stored gradients. Positions whose target is ``ignore_index`` (prompt, padding) get
no logits at all.

The loss is returned as ``(sum over target tokens, number of target tokens)``: the recipe divides
by the number of target tokens of the whole optimizer step, so gradient accumulation never changes
the result (a mean per micro-batch would weight short micro-batches more).
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchft.data.collate import IGNORE_INDEX  # labels not trained on (set by the data pipeline)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits: [n, vocab] any float dtype, targets: [n] -> fp32 scalar
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _FusedChunkedCE(torch.autograd.Function):
    """Loss and gradients computed chunk by chunk in forward; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, targets, output_fn, ce_fn, chunk_size, *params):
        # hidden: [n, dim] (target positions only), targets: [n]
        needs_hidden_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h_chunk = hidden[start:start + chunk_size].detach().requires_grad_(needs_hidden_grad)
            with torch.enable_grad():
                loss = ce_fn(output_fn(h_chunk), targets[start:start + chunk_size])  # logits freed after grad
            wrt = ([h_chunk] if needs_hidden_grad else []) + list(params)
            grads = torch.autograd.grad(loss, wrt) if wrt else ()
            if needs_hidden_grad:
                grad_hidden[start:start + chunk_size] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads):
                acc.add_(g)
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, *[g.to(p.dtype) for g, p in zip(grad_params, params)])
        ctx.has_hidden_grad = needs_hidden_grad
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.has_hidden_grad else None
        scaled_params = [g * grad_output.to(g.dtype) for g in grad_params]
        return (scaled_hidden, None, None, None, None, *scaled_params)


class ChunkedCrossEntropy:
    """Token-weighted cross-entropy over ``output_fn(hidden)`` without holding the full logits.

    Args:
        num_chunks: the target tokens are split into this many chunks (more chunks, less memory).
        ignore_index: target value of positions that do not count (prompt, padding).
        compile: ``torch.compile`` the per-chunk upcast + cross-entropy.

    Call ``loss_fn(hidden, targets, output_fn, params)``:
        hidden: [b, s, dim] final hidden states; targets: [b, s] next-token ids (already shifted,
        ``ignore_index`` where no loss); output_fn: hidden -> logits (``model.output``); params: the
        trainable tensors ``output_fn`` uses (:func:`output_params`), whose gradients are computed
        here. Returns ``(loss_sum, num_tokens)``: fp32 scalar and long scalar.
    """

    def __init__(self, num_chunks: int = 8, ignore_index: int = IGNORE_INDEX, compile: bool = False):
        if num_chunks < 1:
            raise ValueError(f"loss num_chunks ({num_chunks}) must be >= 1")
        self.num_chunks = num_chunks
        self.ignore_index = ignore_index
        self._ce = torch.compile(_ce_sum, dynamic=True) if compile else _ce_sum

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor,
                 output_fn: Callable[[torch.Tensor], torch.Tensor],
                 params: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        keep = targets.reshape(-1) != self.ignore_index  # [b*s]
        num_tokens = keep.sum()
        hidden = hidden.reshape(-1, hidden.shape[-1])[keep]  # [n, dim]; gathers, backward scatters
        kept_targets = targets.reshape(-1)[keep]  # [n]
        n = hidden.shape[0]
        if n == 0:
            return hidden.sum().float() * 0.0, num_tokens
        chunk_size = -(-n // self.num_chunks)
        params = [p for p in params if p.requires_grad]
        if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
            with torch.no_grad():
                total = sum(self._ce(output_fn(hidden[i:i + chunk_size]), kept_targets[i:i + chunk_size])
                            for i in range(0, n, chunk_size))
            return total, num_tokens
        return _FusedChunkedCE.apply(hidden, kept_targets, output_fn, self._ce, chunk_size, *params), num_tokens


def output_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that ``model.output`` uses (tied embedding, or ``lm_head`` and its adapters)."""
    module = model.embed_tokens if getattr(model, "tied_output", False) else model.lm_head
    return [p for p in module.parameters() if p.requires_grad]


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels aligned with the tokens [b, s] -> next-token targets [b, s] (the last position ignored)."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)
