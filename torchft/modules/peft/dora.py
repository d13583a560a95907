"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

The adapted weight is split into a direction and a per-output-row magnitude:

    W' = magnitude * (W + s * B A) / ||W + s * B A||      (row norms, i.e. over the input dim)

``magnitude`` [out_dim] starts as ||W|| (B is zero), so a fresh adapter is the identity. The norm is
detached from the graph, as recommended in the DoRA paper (section 4.3) and as HF peft does, so a
torchft DoRA adapter and the same adapter in peft give the same outputs and the same gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from torchft.modules.peft.lora import LoRALinear


class DoRALinear(LoRALinear):
    """``LoRALinear`` plus a trainable ``magnitude`` [out_dim] (state-dict key ``magnitude``).

    Same arguments as ``LoRALinear``. After the base weight is loaded into a model built on ``meta``,
    call ``initialize_dora_magnitude()`` (or ``torchft.modules.peft.initialize_dora_magnitudes(model)``)
    unless the magnitude comes from an adapter checkpoint. Built on a real device, the magnitude is
    initialized from the random base weight right away.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool = False,
    ):
        super().__init__(in_dim, out_dim, rank, alpha, dropout=dropout, use_bias=use_bias, quantize_base=quantize_base)
        self.magnitude = nn.Parameter(torch.empty(out_dim, dtype=self.lora_a.weight.dtype))
        if not self.magnitude.is_meta and not self.weight.is_meta:
            self.initialize_dora_magnitude()

    def adapter_param_names(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight", "magnitude"]

    def _weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        """Row norms ||W + s * B A|| [out_dim] of weight [out, in] and lora_weight = B A [out, in]."""
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    @torch.no_grad()
    def initialize_dora_magnitude(self) -> None:
        """Set ``magnitude`` to the row norms of the loaded base weight plus the current LoRA delta."""
        weight = self.dequantized_weight().float()
        norm = torch.linalg.norm(weight + self.lora_delta(), dim=1)  # [out_dim]
        if self.magnitude.is_meta:
            self.magnitude = nn.Parameter(norm.to(self.magnitude.dtype), requires_grad=self.magnitude.requires_grad)
        else:
            self.magnitude.copy_(norm)

    def merged_weight(self) -> torch.Tensor:
        """``magnitude * (W + s B A) / ||W + s B A||`` [out_dim, in_dim], in the base weight's dtype."""
        base = self.dequantized_weight()
        adapted = base.float() + self.lora_delta()
        scale = self.magnitude.float() / torch.linalg.norm(adapted, dim=1)  # [out_dim]
        return (scale[:, None] * adapted).to(base.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim]"""
        base_out = self.base_forward(x)
        if self.disabled:
            return base_out
        x_adapter = self.dropout(x)
        lora_out = self.lora_b(self.lora_a(x_adapter))  # [..., out_dim]

        # B A through the modules (not weight @ weight), so parameter hooks such as FSDP's run.
        eye = torch.eye(self.in_dim, device=x.device, dtype=self.lora_a.weight.dtype)  # [in, in]
        lora_weight = self.lora_b(self.lora_a(eye)).T.to(x.dtype)  # [out, in]
        weight = self.dequantized_weight().to(x.dtype)  # [out, in]
        weight_norm = self._weight_norm(weight, lora_weight.detach()).detach()  # [out]
        mag_norm_scale = self.magnitude / weight_norm  # [out]

        # base_out = W x + bias; DoRA rescales the W x part only. With active dropout the
        # adapter path sees dropout(x), so its W x is recomputed on that input.
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_no_bias = base_out if self.bias is None else base_out - self.bias
        else:
            base_no_bias = torch.nn.functional.linear(x_adapter, weight)
        return base_out + (mag_norm_scale - 1) * base_no_bias + mag_norm_scale * lora_out * self.scaling
