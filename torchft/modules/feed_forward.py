"""SwiGLU feed-forward block, storing as little as possible for backward.

``down_proj(silu(gate_proj(x)) * up_proj(x))`` keeps, written plainly, four ``[b, s, intermediate]``
tensors for backward: the gate and up projections, ``silu(gate)`` and the product. Here only the
gate and up projections are kept: :class:`_SiluMul` recomputes ``silu(gate)`` in its backward, and
the product that ``down_proj`` would save is swapped, while it is saved, for a recipe that
recomputes it from those same two tensors (a ``saved_tensors_hooks`` pair around ``down_proj``).
The values and gradients are those of the plain expression.

Under ``torch.compile`` saved-tensor hooks cannot be traced, and the compiler's partitioner keeps
the product (a matmul input in backward is never recomputed by its own rules). There the block
runs ``down_proj(silu(gate) * up)`` through :func:`recompute_in_compiled_backward`, which tells the
partitioner to recompute the product: the compiled layer stays one graph and keeps, as in eager,
only the gate and up projections.

For long sequences the block can also run in sequence tiles (``tile_tokens``): forward keeps only
its input, and backward recomputes one tile at a time, so no ``[s, intermediate]`` tensor of the
whole sequence ever exists.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchft.modules.recompute import can_recompute_when_saved, recompute_in_compiled_backward, recompute_when_saved


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up that saves only gate and up (silu and its derivative are recomputed)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        # d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g))); computed in the input dtype as autograd would
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad_out * up * (sig * (1 + gate * (1 - sig))) if ctx.needs_input_grad[0] else None
        grad_up = grad_out * silu if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _TiledMLP(torch.autograd.Function):
    """Runs ``mlp`` over sequence tiles; keeps only the input; backward recomputes tile by tile."""

    @staticmethod
    def forward(ctx, x, mlp, tile_tokens, *params):
        # x: [b, s, dim]; params: the trainable tensors of mlp (their gradients are returned here)
        ctx.mlp, ctx.tile_tokens = mlp, tile_tokens
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp._swiglu(t) for t in x.split(tile_tokens, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = [p for p, needed in zip(ctx.mlp._trainable(), ctx.needs_input_grad[3:]) if needed]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_params = [None] * len(params)
        for start in range(0, x.shape[1], ctx.tile_tokens):
            tile = x[:, start:start + ctx.tile_tokens].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                y = ctx.mlp._swiglu(tile)  # [b, tile, dim]; its intermediates live for this tile only
            wrt = ([tile] if grad_x is not None else []) + params
            grads = list(torch.autograd.grad(y, wrt, grad_out[:, start:start + ctx.tile_tokens], allow_unused=True))
            if grad_x is not None:
                grad_x[:, start:start + ctx.tile_tokens] = grads.pop(0)
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        by_param = iter(grad_params)
        all_grads = [next(by_param) if needed else None for needed in ctx.needs_input_grad[3:]]
        return (grad_x, None, None, *all_grads)


class FeedForward(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``; the projections are passed in, so a builder can
    hand in plain, LoRA or NF4 linears.

    Attributes (settable on a built model):
        recompute_product: keep only the gate and up projections for backward (default True); set to
            False where the whole layer is recomputed anyway (activation checkpointing).
        tile_tokens: run in sequence tiles of this many tokens, recomputed in backward (None: no tiles).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 tile_tokens: Optional[int] = None) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.recompute_product = True
        self.tile_tokens = tile_tokens

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, dim] -> gate, up: [b, s, intermediate] -> [b, s, dim]
        gate, up = self.gate_proj(x), self.up_proj(x)
        if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad) or not self.recompute_product:
            return self._down_of_product(gate, up)
        if torch.compiler.is_compiling():  # checked first: the hooks query below breaks a compiled graph
            return recompute_in_compiled_backward(self._down_of_product, gate, up)
        if not can_recompute_when_saved():
            return self._down_of_product(gate, up)
        return self._down_of_recomputed_product(gate, up)

    def _down_of_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # gate, up: [b, s, intermediate] -> [b, s, dim]
        return self.down_proj(_silu_mul(gate, up))

    @torch.compiler.disable  # saved-tensor hooks run eagerly (never reached while compiling)
    def _down_of_recomputed_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        product = _SiluMul.apply(gate, up)
        with recompute_when_saved(product, _silu_mul, gate, up):
            return self.down_proj(product)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, dim] -> [b, s, dim]
        if self.tile_tokens is not None and x.shape[1] > self.tile_tokens and torch.is_grad_enabled():
            return self._tiled(x)
        return self._swiglu(x)

    @torch.compiler.disable  # the tile loop and its recompute in backward run eagerly
    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        return _TiledMLP.apply(x, self, self.tile_tokens, *self._trainable())
