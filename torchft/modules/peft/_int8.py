"""Int8 weight-only storage of a frozen base weight (LoRA/DoRA on an 8-bit base), via torchao.

Each output row gets one symmetric scale (per-channel int8, torchao's affine quantization
primitives): ``weight[o, :] ~= qdata[o, :] * scale[o]`` with ``qdata`` in [-127, 127]. The data is a
plain ``int8`` tensor and the scales a plain float tensor, so both move, cast and shard like any
tensor: FSDP2 splits the int8 rows of a weight over ranks like any parameter (no size rule), and the
scales ([out] floats per linear) stay whole on every rank.

torchao is imported only when an int8 base is actually made.
"""
from __future__ import annotations

import torch

INT8_QMAX = 127  # symmetric range [-127, 127]: zero is exact and the range is the same both ways


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] (float) -> (``qdata`` int8 [out, in], ``scale`` [out] in ``weight``'s dtype).

    Works on ``meta`` (shapes only), so a model of any size builds without allocating.
    """
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    with torch.no_grad():
        weight = weight.detach()
        block = (1, weight.shape[1])  # one scale per output row
        scale, zero_point = choose_qparams_affine(weight.float(), MappingType.SYMMETRIC, block, torch.int8,
                                         quant_min=-INT8_QMAX, quant_max=INT8_QMAX, scale_dtype=torch.float32,
                                         zero_point_dtype=torch.int8)
        qdata = quantize_affine(weight.float(), block, scale, zero_point, torch.int8,  # zero_point: zeros
                                quant_min=-INT8_QMAX, quant_max=INT8_QMAX)
        scale = scale.reshape(weight.shape[0])  # [out]
    return qdata, scale.to(weight.dtype)


def dequantize(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``qdata * scale`` [out, in] in ``scale``'s dtype; a sharded ``qdata`` (DTensor) stays sharded."""
    scale = scale.unsqueeze(1)  # [out, 1]
    if type(qdata).__name__ == "DTensor":  # FSDP2 rows: take this rank's rows of the whole scales
        from torch.distributed.tensor import distribute_tensor

        scale = distribute_tensor(scale, qdata.device_mesh, qdata.placements, src_data_rank=None)
    return qdata.to(scale.dtype) * scale


class _Int8Linear(torch.autograd.Function):
    """``x @ (qdata * scale).T`` that saves only the int8 weight for backward (not a float copy).

    The scale is per output row, so it is applied to the output: ``(x @ qdata.T) * scale``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qdata, scale)
        return (x @ qdata.to(x.dtype).T) * scale.to(x.dtype)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qdata, scale = ctx.saved_tensors
        grad_x = (grad_out * scale.to(grad_out.dtype)) @ qdata.to(grad_out.dtype)  # [..., in]
        return grad_x, None, None


def linear_int8(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., in] -> [..., out] through the int8 weight; the base weight gets no gradient."""
    return _Int8Linear.apply(x, qdata, scale)
