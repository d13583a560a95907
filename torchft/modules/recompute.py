"""Saved-tensor hooks that store a tensor autograd wants to keep as the recipe to recompute it.

Many activations are cheap functions of tensors autograd keeps anyway (a norm's output of its input,
SwiGLU's product of the gate and up projections). Under :func:`recompute_when_saved` such a tensor
is not kept: its sources are, and backward rebuilds it bit for bit.

Saved-tensor hooks cannot be traced by ``torch.compile``; in a compiled graph the partitioner
decides what is kept, and :func:`recompute_in_compiled_backward` tells it what to recompute.
"""
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


class _Recipe:
    """Stands for a saved view of a recomputable tensor: its (packed) sources and the view's geometry."""

    def __init__(self, sources, size, stride, offset):
        self.sources, self.size, self.stride, self.offset = sources, size, stride, offset


_UNKNOWN = object()


def _active_saved_tensors_hooks():
    """The innermost active (pack, unpack) pair, None when none, ``_UNKNOWN`` where torch cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return _UNKNOWN
    try:
        return top(False)
    except TypeError:  # releases whose version takes no argument
        return top()


def can_recompute_when_saved() -> bool:
    """Whether :func:`recompute_when_saved` can stack on the hooks active now."""
    return _active_saved_tensors_hooks() is not _UNKNOWN


def recompute_when_saved(target: torch.Tensor, recompute, *sources: torch.Tensor):
    """saved_tensors_hooks under which any saved view of ``target`` is stored as ``sources``
    (which autograd keeps anyway) and rebuilt in backward as ``recompute(*sources)``.

    Hooks already active (accounting, offloading) still see every tensor: they pack the sources in
    place of ``target``, and everything else as before.
    """
    outer = _active_saved_tensors_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (lambda t: t, lambda t: t)
    storage = target.untyped_storage()
    # Only a tensor that owns its whole storage can be told apart from others by its storage.
    owns_storage = (target.is_contiguous() and target.storage_offset() == 0
                    and storage.nbytes() == target.numel() * target.element_size())
    # Storages are told apart by their C++ object, not data_ptr(): every meta tensor (``tune estimate``)
    # has data_ptr 0.
    storage = storage._cdata if owns_storage else None

    def pack(t):
        # (tensor subclasses such as NF4 weights have no plain storage and are never the target)
        if (storage is not None and type(t) is torch.Tensor and t.untyped_storage()._cdata == storage
                and t.dtype == target.dtype):
            offset = t.storage_offset() - target.storage_offset()
            return _Recipe([outer_pack(s) for s in sources], t.size(), t.stride(), offset)
        return outer_pack(t)

    def unpack(packed):
        if isinstance(packed, _Recipe):
            with torch.no_grad():
                full = recompute(*[outer_unpack(s) for s in packed.sources]).contiguous()
            return full.as_strided(packed.size, packed.stride, packed.offset)
        return outer_unpack(packed)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.linear.default, torch.ops.aten._scaled_mm.default)


def _keep_matmuls_and_random_ops(ctx, op, *args, **kwargs):
    """Checkpoint policy: matmul outputs are never recomputed (a LoRA ``lora_a`` output is kept, as
    in eager), nor random ops (a dropout mask drawn again would differ); the rest is recomputed."""
    if op in _MATMULS or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def recompute_in_compiled_backward(fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` inside a compiled graph, with what its backward needs besides matmul outputs
    recomputed from ``args`` (kept anyway) instead of kept.

    The partitioner never recomputes on its own a tensor that a backward matmul reads (SwiGLU's
    product, which ``down_proj`` reads); a selective-checkpoint region marks those for
    recomputation. Call it only while compiling: run eagerly, the region would recompute ``fn``.
    """
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_matmuls_and_random_ops))
