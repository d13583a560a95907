"""LoRA: a frozen linear plus a trainable low-rank update (Hu et al., 2021).

    out = base(x) + (alpha / rank) * lora_b(lora_a(dropout(x)))

``lora_a`` [rank, in_dim] starts Kaiming-uniform and ``lora_b`` [out_dim, rank] starts at zero, so
a fresh adapter leaves the model's output unchanged. With ``quantize_base=True`` the frozen weight
is NF4 (QLoRA) or int8; see ``frozen_linear`` for how it is loaded and saved.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from torchft.modules.peft.frozen_linear import FrozenLinear

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def validate_lora_targets(lora_attn_modules) -> list[str]:
    """Check the attention projections asked to get LoRA; return them as a list.

    Raises:
        ValueError: a name is not one of ``q_proj k_proj v_proj o_proj``, or a bare string was given.
    """
    if isinstance(lora_attn_modules, str):
        raise ValueError(
            f"lora_attn_modules must be a list of names, got the string {lora_attn_modules!r} "
            f"(write [{lora_attn_modules!r}])"
        )
    targets = list(lora_attn_modules)
    for name in targets:
        if name not in LORA_ATTN_MODULES:
            raise ValueError(
                f"unknown LoRA target module {name!r} in lora_attn_modules; valid names: {' '.join(LORA_ATTN_MODULES)}"
            )
    return targets


def validate_lora_hparams(rank, alpha, dropout) -> None:
    """One clear error per bad LoRA hyper-parameter."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank ({rank}) must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"lora alpha ({alpha}) must be positive")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout ({dropout}) must be in [0, 1)")


class LoRALinear(FrozenLinear):
    """A linear layer with a frozen base weight and a trainable rank-``rank`` adapter.

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: adapter rank r (> 0).
        alpha: adapter scale numerator; the update is multiplied by ``alpha / rank`` (> 0).
        dropout: dropout on the adapter's input only, in [0, 1).
        use_bias: the frozen base has a bias.
        quantize_base: store the frozen weight as NF4 (``True`` or ``"nf4"``, QLoRA) or as per-channel
            int8 (``"int8"``); see ``frozen_linear``.

    State-dict keys: ``weight`` [out, in] (+ ``bias``), ``lora_a.weight`` [rank, in],
    ``lora_b.weight`` [out, rank]. Set ``disabled = True`` to get the base output only.
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
        validate_lora_hparams(rank, alpha, dropout)
        super().__init__(in_dim, out_dim, use_bias=use_bias, quantize_base=quantize_base)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.disabled = False
        self.reset_adapter_parameters()

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def adapter_param_names(self) -> list[str]:
        """Names (relative to this module) of the trainable adapter parameters."""
        return ["lora_a.weight", "lora_b.weight"]

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """A fresh adapter: Kaiming-uniform ``lora_a``, zero ``lora_b`` (a no-op on ``meta``)."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def lora_delta(self) -> torch.Tensor:
        """The scaled update ``(alpha / rank) * B @ A`` [out_dim, in_dim], in fp32."""
        return self.scaling * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """``W + (alpha / rank) * B @ A`` [out_dim, in_dim], in ``W``'s dtype and on its device.

        ``W`` is ``base`` when given (e.g. the original weight this layer's NF4 weight was made from),
        else this layer's own (dequantized) weight.
        """
        from torchft.modules.peft.merge import merge_adapter_weight

        base = self.dequantized_weight() if base is None else base
        return merge_adapter_weight(base, self.lora_a.weight, self.lora_b.weight, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim]"""
        if self.fake_quantizing():  # QAT: the merged weight, as the quantized model will hold it
            weight = self.weight  # [out, in]
            if not self.disabled:
                weight = weight + self.scaling * (self.lora_b.weight @ self.lora_a.weight)  # [out, r] @ [r, in]
            return self.fake_quantized_forward(x, weight)
        out = self.base_forward(x)
        if self.disabled:
            return out
        return out + self.scaling * self.lora_b(self.lora_a(self.dropout(x)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"
