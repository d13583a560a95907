"""Root-mean-square layer norm, as Llama uses it."""
import torch
from torch import nn


def _normalize(x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    # x: [..., dim] any dtype, rstd: [..., 1] fp32 -> x / rms(x) in x's dtype
    return (x.float() * rstd).to(x.dtype)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., dim] -> 1 / rms(x): [..., 1] fp32
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x))`` that keeps ``x`` in its own dtype (bf16, not an fp32 copy) and the
    fp32 reciprocal RMS (one value per token) for backward, which recomputes in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = _rstd(x, eps)  # [..., 1] fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * _normalize(x, rstd)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = _normalize(x, rstd)  # [..., dim] in x's dtype, as in forward
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # The gradient reaching the fp32 normalisation, as autograd routes it: through the
            # scale (in the product's dtype), cast to x's dtype, then up to fp32.
            g = (grad_out * weight).to(x.dtype).float()
            n = x.float() * rstd
            grad_x = (rstd * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight``, normalised in fp32 whatever the input dtype.

    Normalising a bf16 activation in bf16 loses enough precision to drift from the reference
    implementation, so the statistic is taken in fp32; the result is cast back to the input dtype
    before the (learned) scale, the same order transformers' Llama uses, so bf16 outputs match.
    For backward only the input (in its own dtype) and one fp32 value per token are kept.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            # compiled graphs choose what to save themselves; the same arithmetic as the function's
            # forward, so a recomputed output equals the stored one bit for bit
            return self.weight * _normalize(x, _rstd(x, self.eps))
        return _RMSNormFunction.apply(x, self.weight, self.eps)
