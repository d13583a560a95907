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
from torchft.modules.peft.merge import merge_adapter_weight


def _refresh_magnitude_after_load(module: "DoRALinear", incompatible_keys) -> None:
    """load_state_dict post-hook (runs after lora_a/lora_b are loaded too): re-initialize a stale
    magnitude from the loaded weights, unless something is still on ``meta`` (then
    ``initialize_adapters`` does it once the adapters exist)."""
    if module._magnitude_stale:
        module._magnitude_stale = False
        if not any(t.is_meta for t in (module.weight, module.lora_a.weight, module.lora_b.weight, module.magnitude)):
            module.initialize_dora_magnitude()


class DoRALinear(LoRALinear):
    """``LoRALinear`` plus a trainable ``magnitude`` [out_dim] (state-dict key ``magnitude``).

    Same arguments as ``LoRALinear``. The magnitude follows the base weight: built on a real device it
    is set from the random weight, and ``load_state_dict`` of a base weight without a ``magnitude``
    resets it from the loaded weight (plus the current LoRA delta). On ``meta`` the adapters do not
    exist yet, so after loading the base weights call ``initialize_adapters(model)`` (or, with the
    adapters already real, ``initialize_dora_magnitude()`` / ``initialize_dora_magnitudes(model)``).
    A magnitude loaded from an adapter checkpoint is used as is.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool | str = False,
    ):
        super().__init__(in_dim, out_dim, rank, alpha, dropout=dropout, use_bias=use_bias, quantize_base=quantize_base)
        self.magnitude = nn.Parameter(torch.empty(out_dim, dtype=self.lora_a.weight.dtype))
        if not self.magnitude.is_meta and not self.weight.is_meta:
            self.initialize_dora_magnitude()
        self._magnitude_stale = False
        self.register_load_state_dict_post_hook(_refresh_magnitude_after_load)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A new base weight without a magnitude next to it: the magnitude must follow the new weight.
        self._magnitude_stale = prefix + "weight" in state_dict and prefix + "magnitude" not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

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

    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """``magnitude * (W + s B A) / ||W + s B A||`` [out_dim, in_dim], in ``W``'s dtype (``W`` as in LoRALinear)."""
        base = self.dequantized_weight() if base is None else base
        return merge_adapter_weight(base, self.lora_a.weight, self.lora_b.weight, self.scaling, self.magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim]"""
        base_out = self.base_forward(x)
        if self.disabled:
            return base_out
        x_adapter = self.dropout(x)
        lora_out = self.lora_b(self.lora_a(x_adapter))  # [..., out_dim]

        # The norm is detached (see the module docstring), so it is computed without a graph: no
        # [out, in] temporaries are kept for backward. The weights are read inside this module's
        # forward, where FSDP2 has already gathered them.
        with torch.no_grad():
            lora_weight = (self.lora_b.weight @ self.lora_a.weight).to(x.dtype)  # [out, r] @ [r, in] -> [out, in]
            weight = self.dequantized_weight().to(x.dtype)  # [out, in]
            weight_norm = self._weight_norm(weight, lora_weight)  # [out]
            del lora_weight, weight
        mag_norm_scale = self.magnitude / weight_norm  # [out]

        # base_out = W x + bias; DoRA rescales the W x part only. With active dropout the
        # adapter path sees dropout(x), so its W x is recomputed on that input.
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_no_bias = base_out if self.bias is None else base_out - self.bias
        else:
            base_no_bias = self.base_forward(x_adapter)  # NF4 stays NF4 in the autograd graph
            base_no_bias = base_no_bias if self.bias is None else base_no_bias - self.bias
        return base_out + (mag_norm_scale - 1) * base_no_bias + mag_norm_scale * lora_out * self.scaling
