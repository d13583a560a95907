"""Rotary position embeddings (RoPE) in the rotate-half layout, with Llama 3.1 frequency scaling.

The rotate-half layout pairs dimension ``i`` with ``i + head_dim/2`` (transformers' convention), so
Hugging Face checkpoints load without permuting q/k; Meta's consolidated checkpoints use the
interleaved layout and are permuted on conversion (see ``torchft.checkpoint``).
"""
import math
from typing import Any, Optional

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def rope_inverse_frequencies(head_dim: int, base: float, scaling: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (fp32, CPU), scaled as ``scaling`` says.

    ``scaling`` follows config.json's ``rope_scaling``: ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1/3.2),
    ``{"rope_type": "linear", "factor"}``, or None / ``rope_type: default`` for none.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths are slowed by ``factor``, short ones kept, and the band
    between ``original_max / high_freq_factor`` and ``original_max / low_freq_factor`` interpolated."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_context = float(scaling["original_max_position_embeddings"])

    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor  # longer than this: fully scaled
    high_freq_wavelen = original_context / high_freq_factor  # shorter than this: untouched
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, interpolated, scaled)


class RotaryEmbedding(nn.Module):
    """Computes the ``cos`` / ``sin`` tables for given positions; one instance serves every layer.

    The inverse frequencies are kept as a plain CPU tensor (not a buffer) and moved to the input's
    device on first use: a model built on the meta device and loaded with ``assign=True`` then needs
    no extra initialisation step for RoPE.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        self.head_dim = head_dim
        self.base = base
        self.scaling = dict(scaling) if scaling else None
        self._inv_freq_cpu = rope_inverse_frequencies(head_dim, base, self.scaling)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq_by_device[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [b, s] long -> (cos, sin), each [b, s, head_dim] in ``dtype``."""
        inv_freq = self._inv_freq(positions.device)
        freqs = positions.float()[..., None] * inv_freq  # [b, s, head_dim/2], fp32
        angles = torch.cat((freqs, freqs), dim=-1)  # [b, s, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d] with halves (a, b) mapped to (-b, a)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, head_dim]; cos/sin: [b, s, head_dim] -> rotated x, same shape."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
