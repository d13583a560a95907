"""Root-mean-square layer norm, as Llama uses it."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight``, normalised in fp32 whatever the input dtype.

    Normalising a bf16 activation in bf16 loses enough precision to drift from the reference
    implementation, so the statistic is taken in fp32; the result is cast back to the input dtype
    before the (learned) scale, the same order transformers' Llama uses, so bf16 outputs match.

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
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)
