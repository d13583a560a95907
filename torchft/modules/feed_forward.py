"""SwiGLU feed-forward block."""
import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``; the projections are passed in, so a builder can
    hand in plain, LoRA or NF4 linears."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s, dim] -> [b, s, intermediate] -> [b, s, dim]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
