"""A linear layer whose weight is frozen and may be stored as NF4 (the base of LoRA/DoRA/QLoRA).

NF4 storage rules (QLoRA):

* the weight is quantized when it is loaded: ``load_state_dict`` accepts plain bf16/fp32 tensors
  (also with ``assign=True`` on a model built on ``meta``) and stores them as NF4;
* ``state_dict()`` dequantizes: it always yields plain tensors under the plain names, so what a
  QLoRA model saves loads into any model, quantized or not;
* a weight whose element count is not a multiple of 16384 (blocks of 64, scales in blocks of 256)
  cannot be NF4: it stays in its floating-point dtype and a warning names the layer and the rule.
  Every linear of the Llama presets satisfies the rule; only tiny test models hit it;
* ``module.to(dtype)`` keeps NF4 (re-quantized in the new dtype); ``module.to(device)`` moves it.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from torchft.modules.peft import _nf4


def _dequantize_nf4_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: replace an NF4 weight by its dequantized plain tensor."""
    key = prefix + "weight"
    if key in state_dict and _nf4.is_nf4(state_dict[key]):
        state_dict[key] = _nf4.dequantize(state_dict[key])


class FrozenLinear(nn.Module):
    """``y = x @ weight.T + bias`` with a frozen ``weight`` [out_dim, in_dim] (NF4 when ``quantize_base``).

    The parameters are named like ``nn.Linear``'s, so checkpoints of a plain model load unchanged.
    Built on a real device it gets ``nn.Linear``'s random initialization; built on ``meta`` it
    allocates nothing and expects ``load_state_dict(..., assign=True)``.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = False, quantize_base: bool = False):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        # Why the weight cannot be NF4 (None when it can, or when NF4 was not asked for).
        self._nf4_problem = _nf4.nf4_size_problem((out_dim, in_dim)) if quantize_base else None
        self.quantize_base = quantize_base and self._nf4_problem is None

        weight = torch.empty(out_dim, in_dim)  # [out, in], on the ambient device (meta allocates nothing)
        bias = torch.empty(out_dim) if use_bias else None
        if not weight.is_meta:
            self._init_like_nn_linear(weight, bias)
            if self._nf4_problem is not None:
                warnings.warn(f"{self._describe()}: {self._nf4_problem}; this base weight stays in {weight.dtype}")
        if self.quantize_base:
            weight = _nf4.to_nf4(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if use_bias else None
        self.register_state_dict_post_hook(_dequantize_nf4_in_state_dict)

    def _describe(self) -> str:
        return f"{type(self).__name__}(in_dim={self.in_dim}, out_dim={self.out_dim})"

    @staticmethod
    @torch.no_grad()
    def _init_like_nn_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if incoming is not None and self._nf4_problem is not None:
            warnings.warn(f"{prefix[:-1] or self._describe()}: {self._nf4_problem}; this base weight stays in {incoming.dtype}")
        quantize = (
            incoming is not None
            and self.quantize_base
            and not _nf4.is_nf4(incoming)
            and tuple(incoming.shape) == tuple(self.weight.shape)  # a wrong shape is reported by nn.Module
        )
        if quantize:
            # Quantize on load. With assign=True (model built on meta) the checkpoint's dtype and device
            # are kept, as nn.Module does for plain tensors; otherwise we match the existing weight.
            # The NF4 weight always replaces the old one: copying into an existing NF4 tensor would skip
            # its lookup table and mean (torchao leaves those on meta after ``to_empty``).
            assign = local_metadata.get("assign_to_params_buffers", False)
            if not assign and not self.weight.is_meta:
                incoming = incoming.to(device=self.weight.device, dtype=self.weight.dtype)
            nf4_weight = _nf4.to_nf4(incoming)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if quantize:
            self.weight = nn.Parameter(nf4_weight, requires_grad=False)
            if key in missing_keys:
                missing_keys.remove(key)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` / ``.half()`` would turn an NF4 weight into a plain one (torchao
        # dequantizes on a dtype change): apply ``fn`` to the rest as usual, then keep NF4 storage,
        # re-quantized in the new dtype. Device moves keep the NF4 data as it is.
        if not _nf4.is_nf4(self.weight):
            return super()._apply(fn, recurse)
        nf4_weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = nf4_weight
        with torch.no_grad():
            applied = fn(nf4_weight)
        if not _nf4.is_nf4(applied):
            applied = _nf4.to_nf4(applied)
        self._parameters["weight"] = nn.Parameter(applied, requires_grad=False)
        return self

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: [..., in_dim] -> [..., out_dim]."""
        if _nf4.is_nf4(self.weight):
            out = _nf4.linear_nf4(x, self.weight)  # saves only the NF4 weight for backward
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight [out_dim, in_dim] as a plain tensor (NF4 is dequantized to its dtype)."""
        return _nf4.dequantize(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, bias={self.bias is not None}, nf4={self.quantize_base}"


class FrozenNF4Linear(FrozenLinear):
    """A frozen linear of a QLoRA model that has no adapter: the weight is stored as NF4.

    Args:
        in_dim: input features.
        out_dim: output features.
        use_bias: add a (frozen, floating-point) bias.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = False):
        super().__init__(in_dim, out_dim, use_bias=use_bias, quantize_base=True)
