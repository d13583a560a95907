"""Cross-entropy that never materialises the full logits, and returns a token-weighted sum.

A Llama 3 vocabulary has 128,256 entries: the logits of 4 x 2048 tokens in fp32 take 4 GiB, and a
plain ``F.cross_entropy(model(tokens).float(), ...)`` keeps several such tensors alive for backward.
:class:`ChunkedCrossEntropy` instead takes the final hidden states (``model.hidden_states()``) and
the output projection (``model.output``), and walks the positions ``chunk_tokens`` at a time: each
chunk's logits are computed, its loss and its gradients (with respect to the hidden states and the
output projection's trainable weights) are taken at once, and the logits are freed. Backward then
only scales the stored gradients. The memory of the loss is therefore one chunk of logits (bounded
whatever the sequence length) plus a gradient the size of the hidden states.

It never synchronises with the device: every chunk has a shape known from the input's shape (no
boolean gather of the target positions, no ``.item()``); positions whose target is ``ignore_index``
(prompt, padding) are handled inside ``F.cross_entropy`` and get a zero gradient.

The loss is returned as ``(sum over target tokens, number of target tokens)``: the recipe divides
by the number of target tokens of the whole optimizer step, so gradient accumulation never changes
the result (a mean per micro-batch would weight short micro-batches more).
"""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchft.data.collate import IGNORE_INDEX  # labels not trained on (set by the data pipeline)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # logits: [n, vocab] any float dtype, targets: [n] -> fp32 scalar (ignored positions add 0)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


class _RowDynamicCE:
    """A compiled ``_ce_sum`` whose row count is symbolic from the first call.

    The last chunk of a batch has ``b * s mod chunk`` rows, which changes with every padded batch
    length (and ``num_chunks`` changes every chunk's size): compiled for static shapes, each new
    length would recompile, and the compiler falls back to eager after a few. With the rows marked
    dynamic one graph serves every chunk of two rows or more (a one-row chunk gets its own graph).
    """

    def __init__(self, compiled: Callable[..., torch.Tensor]) -> None:
        self.compiled = compiled

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        # logits: [n, vocab], targets: [n]; the vocabulary stays static
        torch._dynamo.maybe_mark_dynamic(logits, 0)
        torch._dynamo.maybe_mark_dynamic(targets, 0)
        return self.compiled(logits, targets, ignore_index)


def _rows(targets, start: int, stop: int):
    """Rows ``start:stop`` of a [n, ...] tensor, or of each tensor of a tuple."""
    if isinstance(targets, tuple):
        return tuple(t[start:stop] for t in targets)
    return targets[start:stop]


class _FusedChunkedCE(torch.autograd.Function):
    """Loss and gradients computed chunk by chunk in forward; backward scales the saved gradients.

    The output layer's gradient is accumulated in the parameter's own dtype (as autograd would
    accumulate it), so no fp32 copy of a [vocab, dim] matrix waits for backward.
    """

    @staticmethod
    def forward(ctx, hidden, targets, output_fn, ce_fn, chunk_size, ignore_index, *params):
        # hidden: [n, dim] (every position), targets: [n], or a tuple of [n, ...] tensors cut into the
        # same chunks and handed to ce_fn together (e.g. the targets and a teacher's hidden states)
        needs_hidden_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h_chunk = hidden[start:start + chunk_size].detach().requires_grad_(needs_hidden_grad)
            with torch.enable_grad():
                # logits [chunk, vocab] live only inside this iteration
                loss = ce_fn(output_fn(h_chunk), _rows(targets, start, start + chunk_size), ignore_index)
            wrt = ([h_chunk] if needs_hidden_grad else []) + list(params)
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
            if needs_hidden_grad:
                grad_hidden[start:start + chunk_size] = grads.pop(0)
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.has_hidden_grad = needs_hidden_grad
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        # Scaled in place: the stored gradients are used once and become the returned ones.
        if ctx.has_hidden_grad:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        grad_params = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grad_params]
        return (grad_hidden, None, None, None, None, None, *grad_params)


class ChunkedCrossEntropy:
    """Token-weighted cross-entropy over ``output_fn(hidden)`` without holding the full logits.

    Args:
        chunk_tokens: positions per chunk; a chunk's logits take ``chunk_tokens * vocab`` elements
            whatever the sequence length (fewer tokens, less memory, more launches).
        num_chunks: instead of ``chunk_tokens``, split each batch into this many chunks (the chunk
            then grows with the sequence length).
        ignore_index: target value of positions that do not count (prompt, padding).
        compile: ``torch.compile`` the per-chunk upcast + cross-entropy.

    Call ``loss_fn(hidden, targets, output_fn, params)``:
        hidden: [b, s, dim] final hidden states; targets: [b, s] next-token ids (already shifted,
        ``ignore_index`` where no loss); output_fn: hidden -> logits (``model.output``); params: the
        trainable tensors ``output_fn`` uses (:func:`output_params`), whose gradients are computed
        here. Returns ``(loss_sum, num_tokens)``: fp32 scalar and long scalar, both on the device
        (nothing is read back to the host).
    """

    def __init__(self, chunk_tokens: int = 1024, num_chunks: Optional[int] = None,
                 ignore_index: int = IGNORE_INDEX, compile: bool = False):
        if chunk_tokens < 1:
            raise ValueError(f"loss chunk_tokens ({chunk_tokens}) must be >= 1")
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"loss num_chunks ({num_chunks}) must be >= 1")
        self.chunk_tokens = chunk_tokens
        self.num_chunks = num_chunks
        self.ignore_index = ignore_index
        self._ce = _RowDynamicCE(torch.compile(_ce_sum)) if compile else _ce_sum

    def chunk_size(self, num_positions: int) -> int:
        """Positions per chunk for a batch of ``num_positions`` (b * s) positions."""
        if self.num_chunks is not None:
            return max(1, -(-num_positions // self.num_chunks))
        return self.chunk_tokens

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor,
                 output_fn: Callable[[torch.Tensor], torch.Tensor],
                 params: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        targets = targets.reshape(-1)  # [n]
        num_tokens = (targets != self.ignore_index).sum()
        return self._chunked_sum(hidden, targets, output_fn, params, self._ce), num_tokens

    def _chunked_sum(self, hidden: torch.Tensor, targets, output_fn, params: Sequence[torch.Tensor],
                     loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """[] fp32 sum of ``loss_fn(logits_chunk, targets_chunk, ignore_index)`` over the chunks of
        ``hidden`` [b, s, dim]; ``targets``: [n] or a tuple of [n, ...] tensors cut the same way."""
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [n, dim]
        chunk = self.chunk_size(hidden.shape[0])
        params = [p for p in params if p.requires_grad]
        if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
            with torch.no_grad():
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                for i in range(0, hidden.shape[0], chunk):
                    total += loss_fn(output_fn(hidden[i:i + chunk]), _rows(targets, i, i + chunk), self.ignore_index)
            return total
        return _FusedChunkedCE.apply(hidden, targets, output_fn, loss_fn, chunk, self.ignore_index, *params)


def output_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that ``model.output`` uses (tied embedding, or ``lm_head`` and its adapters)."""
    module = model.embed_tokens if getattr(model, "tied_output", False) else model.lm_head
    return [p for p in module.parameters() if p.requires_grad]


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels aligned with the tokens [b, s] -> next-token targets [b, s] (the last position ignored)."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)
