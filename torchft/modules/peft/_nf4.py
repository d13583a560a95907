"""Thin layer over torchao's NF4 tensor (QLoRA's 4-bit NormalFloat storage).

torchao is imported only when NF4 is actually used, so building or importing a plain LoRA model
never pays for it. The quantization itself is torchao's; this file only adds the size rule, the
byte count and an ``isinstance`` check that does not import torchao.
"""
from __future__ import annotations

import sys

import torch

# QLoRA's layout: one absmax scale per block of 64 weights; the scales are themselves quantized to
# int8 in blocks of 256 ("double quantization").
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
NF4_NUMEL_MULTIPLE = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE  # 16384


def _torchao_nf4():
    """Return (NF4Tensor, to_nf4, linear_nf4) from whichever torchao layout is installed."""
    try:  # torchao >= 0.16
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4, to_nf4
    except ImportError:  # older releases
        from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4
    return NF4Tensor, to_nf4, linear_nf4


def is_nf4(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is a torchao NF4Tensor (never imports torchao just to answer no)."""
    if "torchao" not in sys.modules:
        return False
    nf4_tensor_cls, _, _ = _torchao_nf4()
    return isinstance(tensor, nf4_tensor_cls)


def nf4_size_problem(shape: tuple[int, ...] | torch.Size) -> str | None:
    """Why a weight of this shape cannot be stored as NF4, or None when it can."""
    numel = 1
    for size in shape:
        numel *= size
    if numel % NF4_NUMEL_MULTIPLE != 0:
        dims = "x".join(str(size) for size in shape)
        return (
            f"NF4 needs the element count to be divisible by {NF4_NUMEL_MULTIPLE} "
            f"(blocks of {NF4_BLOCK_SIZE} x double-quantized scales in blocks of {NF4_SCALER_BLOCK_SIZE}), "
            f"got {dims} = {numel}"
        )
    return None


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Quantize a floating-point weight to NF4 with QLoRA's block sizes (64, scales in blocks of 256).

    The NF4 tensor remembers ``weight.dtype``: dequantizing gives that dtype back. Works on ``meta``.
    """
    _, torchao_to_nf4, _ = _torchao_nf4()
    with torch.no_grad():
        return torchao_to_nf4(weight.detach().contiguous(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` dequantizing the NF4 weight on the fly; autograd saves only the NF4 weight."""
    _, _, torchao_linear_nf4 = _torchao_nf4()
    return torchao_linear_nf4(x, weight)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the weight: NF4 is dequantized to its original dtype, others pass through."""
    if is_nf4(weight):
        return weight.get_original_weight()
    return weight


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies in storage; an NF4 tensor counts its packed data and all its scales.

    Works on ``meta`` tensors, so the memory of a model can be known before it is loaded.
    """
    if is_nf4(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, name).nbytes for name in inner_names)
    return tensor.numel() * tensor.element_size()
