"""A linear layer whose weight is frozen and may be stored quantized (the base of LoRA/DoRA/QLoRA).

``quantize_base`` picks the storage of the frozen weight: ``False`` (as built or loaded),
``True`` or ``"nf4"`` (QLoRA's 4-bit NormalFloat) or ``"int8"`` (per-channel int8 weight-only,
see ``_int8``). Both quantized formats follow the same rules: the weight is quantized when it is
loaded, ``state_dict()`` yields it dequantized under the plain name, and ``dequantized_weight()``
gives the plain tensor a merge or a DoRA norm needs.

int8 storage: ``weight`` is an ``int8`` parameter [out, in] and ``weight_scale`` a buffer [out]
(one scale per output row, in the model's dtype, not in the state dict). Any shape can be int8.

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

from torchft.modules.peft import _int8, _nf4

BASE_FORMATS = ("nf4", "int8")


def base_format(quantize_base: bool | str | None) -> str | None:
    """The storage ``quantize_base`` asks for: None (plain), ``"nf4"`` (``True`` too) or ``"int8"``.

    Raises:
        ValueError: any other value.
    """
    if quantize_base is None or quantize_base is False:
        return None
    if quantize_base is True:
        return "nf4"
    if isinstance(quantize_base, str) and quantize_base.lower() in BASE_FORMATS:
        return quantize_base.lower()
    raise ValueError(f"quantize_base must be false, true (nf4), 'nf4' or 'int8', got {quantize_base!r}")


def _dequantize_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: replace a quantized (NF4 or int8) weight by its dequantized plain tensor."""
    key = prefix + "weight"
    if key in state_dict and (_nf4.is_nf4(state_dict[key]) or module.base_format == "int8"):
        state_dict[key] = module.dequantized_weight()


class FrozenLinear(nn.Module):
    """``y = x @ weight.T + bias`` with a frozen ``weight`` [out_dim, in_dim], stored as ``quantize_base`` says.

    The parameters are named like ``nn.Linear``'s, so checkpoints of a plain model load unchanged.
    Built on a real device it gets ``nn.Linear``'s random initialization; built on ``meta`` it
    allocates nothing and expects ``load_state_dict(..., assign=True)``.

    Attributes:
        base_format: ``"nf4"``, ``"int8"`` or None: how the weight is stored.
        quantize_base: True when the weight is stored quantized (either format).
    """

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = False, quantize_base: bool | str = False):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        requested = base_format(quantize_base)
        # Why the weight cannot be NF4 (None when it can, or when NF4 was not asked for).
        self._nf4_problem = _nf4.nf4_size_problem((out_dim, in_dim)) if requested == "nf4" else None
        self.base_format = None if self._nf4_problem is not None else requested
        self.quantize_base = self.base_format is not None

        weight = torch.empty(out_dim, in_dim)  # [out, in], on the ambient device (meta allocates nothing)
        bias = torch.empty(out_dim) if use_bias else None
        if not weight.is_meta:
            self._init_like_nn_linear(weight, bias)
            if self._nf4_problem is not None:
                warnings.warn(f"{self._describe()}: {self._nf4_problem}; this base weight stays in {weight.dtype}")
        scale = None
        if self.base_format == "nf4":
            weight = _nf4.to_nf4(weight)
        elif self.base_format == "int8":
            weight, scale = _int8.quantize(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if use_bias else None
        # Quantization-aware training attaches fake quantizers here (see torchft.training.qat): callables
        # [..., in] -> [..., in] and [out, in] -> [out, in] with an ``enabled`` flag; None: a plain layer.
        self.input_fake_quantizer = None
        self.weight_fake_quantizer = None
        # Derived from the weight, so not in the state dict; counted by ``weight_bytes``.
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_state_dict_post_hook(_dequantize_in_state_dict)

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
            # The quantized weight always replaces the old one: copying into an existing NF4 tensor would
            # skip its lookup table and mean (torchao leaves those on meta after ``to_empty``).
            assign = local_metadata.get("assign_to_params_buffers", False)
            if not assign and not self.weight.is_meta:
                incoming = incoming.to(device=self.weight.device, dtype=self._float_dtype())
            quantized = self._quantize(incoming)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if quantize:
            self.set_quantized_weight(*quantized)
            if key in missing_keys:
                missing_keys.remove(key)

    def _float_dtype(self) -> torch.dtype:
        """The floating-point dtype the base weight stands for (an int8 weight's is its scales')."""
        return self.weight_scale.dtype if self.base_format == "int8" else self.weight.dtype

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A plain weight [out, in] in this layer's storage: (NF4 weight, None) or (int8 data, scales [out])."""
        if self.base_format == "int8":
            return _int8.quantize(weight)
        return _nf4.to_nf4(weight), None

    def set_quantized_weight(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Install an already quantized (or sharded) base weight, and for int8 its scales [out]."""
        self.weight = nn.Parameter(weight, requires_grad=False)
        if scale is not None:
            self.weight_scale = scale

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
        elif self.base_format == "int8":
            out = _int8.linear_int8(x, self.weight, self.weight_scale)  # saves only the int8 weight
        else:
            return F.linear(x, self.weight, self.bias)
        return out if self.bias is None else out + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight [out_dim, in_dim] as a plain tensor (NF4 and int8 dequantized to their dtype)."""
        if self.base_format == "int8":
            return _int8.dequantize(self.weight, self.weight_scale)
        return _nf4.dequantize(self.weight)

    def fake_quantizing(self) -> bool:
        """Whether quantization-aware training's fake quantizers are attached and enabled."""
        return self.weight_fake_quantizer is not None and self.weight_fake_quantizer.enabled

    def fake_quantized_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim] through fake-quantized ``x`` and ``weight`` [out_dim, in_dim]:
        the numerics of the quantized layer this one becomes."""
        if self.input_fake_quantizer is not None:
            x = self.input_fake_quantizer(x)
        return F.linear(x, self.weight_fake_quantizer(weight), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quantizing():
            return self.fake_quantized_forward(x, self.weight)
        return self.base_forward(x)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, bias={self.bias is not None}, base={self.base_format or 'plain'}"


class FrozenNF4Linear(FrozenLinear):
    """A frozen linear of a QLoRA model that has no adapter: the weight is stored as NF4.

    Args:
        in_dim: input features.
        out_dim: output features.
        use_bias: add a (frozen, floating-point) bias.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = False):
        super().__init__(in_dim, out_dim, use_bias=use_bias, quantize_base=True)
