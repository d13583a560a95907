"""Grouped-query self-attention through ``scaled_dot_product_attention`` (or flex_attention).

Packed batches on CUDA carry a flex_attention ``BlockMask``. flex_attention is only a fused kernel
when compiled (run eagerly it builds the whole ``[s, s]`` score matrix), so it is compiled once per
process at module level, whether or not the rest of the model is compiled.
"""
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from torchft.modules.kv_cache import KVCache
from torchft.modules.rope import apply_rotary

try:  # flex_attention carries the block-causal masks of packed batches on CUDA.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch builds without flex attention
    BlockMask, flex_attention = None, None

AttentionMask = Union[torch.Tensor, "BlockMask", None]

_compiled_flex_attention = None  # built on first use: compiling costs nothing until a BlockMask is seen


def _compile_failure_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not be compiled" (dynamo's and inductor's; names vary by release)."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    found = [getattr(dynamo_exc, "TorchDynamoException", None)]  # BackendCompilerFailed, Unsupported, ...
    found += [getattr(inductor_exc, name, None) for name in ("InductorError", "CppCompileError", "CUDACompileError")]
    return tuple(t for t in found if t is not None)


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it wraps, outermost first."""
    chain = [err]
    while (inner := getattr(chain[-1], "inner_exception", None) or chain[-1].__cause__) is not None:
        chain.append(inner)
    return chain


def _is_compile_failure(err: BaseException) -> bool:
    """A compiler failure, and not an out-of-memory error it wraps (that one must reach the caller)."""
    return (isinstance(err, _compile_failure_types())
            and not any(isinstance(e, torch.OutOfMemoryError) for e in _causes(err)))


def fused_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: "BlockMask",
                         enable_gqa: bool) -> torch.Tensor:
    """flex_attention as a fused kernel (compiled once per process, static shapes).

    Inside a compiled model it is traced with the model. Where it cannot be compiled (no C++
    compiler for the CPU backend, an unsupported device) it warns once and runs unfused from then
    on; any other error (out of memory included) is raised.
    q: [b, h, s, hd]; k, v: [b, kvh, kv_len, hd] -> [b, h, s, hd].
    """
    global _compiled_flex_attention
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    try:
        return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    except Exception as err:  # noqa: BLE001 - only compiler failures are handled, the rest re-raised
        if _compiled_flex_attention is flex_attention or not _is_compile_failure(err):
            raise
        reason = _causes(err)[-1]
        warnings.warn(f"flex_attention could not be compiled on {q.device.type} ({type(reason).__name__}: "
                      f"{str(reason).splitlines()[0] if str(reason) else ''}); running it unfused from now on, "
                      "which builds the [s, s] score matrix", stacklevel=2)
        _compiled_flex_attention = flex_attention
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention where ``num_kv_heads`` key/value heads are shared by groups of query heads.

    The projections are passed in (plain, LoRA or NF4 linears), named as in transformers' Llama.

    Args:
        num_heads: query heads.
        num_kv_heads: key/value heads; ``num_heads`` must be a multiple of it.
        head_dim: size of one head.
        q_proj, k_proj, v_proj, o_proj: dim -> num_heads*head_dim, dim -> num_kv_heads*head_dim (x2),
            num_heads*head_dim -> dim.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask = None) -> torch.Tensor:
        """x: [b, s, dim]; cos/sin: [b, s, head_dim]; mask: None (causal), bool [b, s, kv_len]
        (True = may attend) or a flex BlockMask -> [b, s, dim]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, hd]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kvh, s, hd]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if self.kv_cache is not None:
            if mask is None:  # before the update: the new tokens see the filled slots and themselves
                mask = self.kv_cache.causal_mask(s)[None]  # [1, s, cache_len]
            k, v = self.kv_cache.update(k, v)  # [b, kvh, cache_len, hd]

        if BlockMask is not None and isinstance(mask, BlockMask):
            out = fused_flex_attention(q, k, v, mask, enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            out = self._sdpa(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        if mask is None:
            # The fused kernels take grouped heads directly when no mask is given.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        if groups > 1:
            # With an explicit mask the memory-efficient kernel needs equal head counts.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # mask: [b, 1, s, kv]
