"""Live-byte accounting of one training step, by kind, on real or meta tensors alike.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every tensor an op returns is recorded by its
storage (views share a record), and a ``weakref.finalize`` on the storage takes it off when the
last tensor using it dies. The live total after each op is the allocated memory of a caching
allocator that frees eagerly; its maximum is the peak. A record keeps the kind it is finally given
(weights, gradients, saved activations, ...), so the breakdown of the peak is known at the end.

:class:`FusedKernels` is a ``TorchFunctionMode`` that makes meta tensors behave like the GPU run:

* ``scaled_dot_product_attention`` without a mask is accounted as the flash kernel uses memory:
  the output and an fp32 log-sum-exp row per head are saved, backward holds an fp32 accumulator
  for the query gradient; never a ``[s, s]`` score matrix (real tensors still compute the values);
* a boolean-mask gather (``x[mask]``) on meta, whose size depends on data, keeps every position
  (the worst case: every token is a target).

:func:`offloaded_to_host` moves what autograd saves outside the checkpointed layers to "host"
memory (counted apart), the way ``torch.autograd.graph.save_on_cpu`` does on a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from torchft.modules.peft._nf4 import is_nf4

# The kinds a byte can be counted as, in the order reports list them.
KINDS = ("weights", "quantized_base", "adapters", "gradients", "optimizer_states", "saved_activations",
         "temporaries", "loss_chunks")

# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
ALLOCATION_GRANULARITY = 512


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATION_GRANULARITY) * ALLOCATION_GRANULARITY


@dataclasses.dataclass
class _Record:
    nbytes: int
    kind: str
    phase: str
    alive: bool = True


class MemoryTracker(TorchDispatchMode):
    """Tracks live device bytes by kind while active; ``peak_bytes`` and ``peak_breakdown()`` after.

    ``phase(name)`` says what the step is doing (``forward``, ``loss``, ``backward``, ``optimizer``):
    new tensors get the phase's kind. Inside ``optimizer`` the peak is not updated op by op: the
    update counts as one fused kernel (its per-parameter temporaries are not held on a GPU).
    """

    _PHASE_KINDS = {"setup": "temporaries", "forward": "temporaries", "loss": "loss_chunks",
                    "backward": "temporaries", "optimizer": "optimizer_states"}

    def __init__(self) -> None:
        super().__init__()
        self._records: list[_Record] = []
        self._by_storage: dict[int, int] = {}  # id(storage) -> record index, for live storages
        self.live_bytes = 0
        self.peak_bytes = 0
        self._peak_live: frozenset[int] = frozenset()
        self._live: set[int] = set()
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self._phase = "setup"
        self._paused = 0

    # ---- recording ------------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor, kind: str | None = None, *, retag: bool = False) -> None:
        """Count ``tensor``'s storage (NF4: its packed parts) as ``kind`` (default: the phase's)."""
        if not isinstance(tensor, torch.Tensor):
            return
        if is_nf4(tensor):
            for name in tensor.__tensor_flatten__()[0]:
                self.track(getattr(tensor, name), "quantized_base", retag=retag)
            return
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return  # other wrapper subclasses: their inner tensors are tracked as they are made
        storage = tensor.untyped_storage()
        index = self._by_storage.get(id(storage))
        if index is not None:
            if retag and kind is not None:
                self._records[index].kind = kind
            return
        index = len(self._records)
        record = _Record(_rounded(storage.nbytes()), kind or self._PHASE_KINDS[self._phase], self._phase)
        self._records.append(record)
        self._by_storage[id(storage)] = index
        self._live.add(index)
        self.live_bytes += record.nbytes
        weakref.finalize(storage, self._release, id(storage), index)

    def _release(self, storage_id: int, index: int) -> None:
        record = self._records[index]
        record.alive = False
        self._by_storage.pop(storage_id, None)
        self._live.discard(index)
        self.live_bytes -= record.nbytes

    def update_peak(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_live = frozenset(self._live)

    def add_host_bytes(self, nbytes: int) -> None:
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    # ---- phases ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous
            if name == "forward":  # what the forward made and is still alive is kept for backward
                for index in self._live:
                    if self._records[index].phase == "forward":
                        self._records[index].kind = "saved_activations"
            self.update_peak()

    def switch_phase(self, name: str) -> str:
        """Enter phase ``name`` without a ``with`` block (from autograd hooks); returns the previous one."""
        previous, self._phase = self._phase, name
        return previous

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops inside are not recorded (the caller accounts their result itself)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes by kind at the peak (kinds as finally assigned), every kind present."""
        breakdown = dict.fromkeys(KINDS, 0)
        for index in self._peak_live:
            record = self._records[index]
            breakdown[record.kind] = breakdown.get(record.kind, 0) + record.nbytes  # + e.g. teacher_weights
        return breakdown

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._paused:
            for tensor in tree_flatten(out)[0]:
                self.track(tensor)
            if self._phase != "optimizer":
                self.update_peak()
        return out


class _FlashAttention(torch.autograd.Function):
    """Causal attention with the memory of a flash kernel: saves q, k, v, out and an fp32
    log-sum-exp [b, h, s]; backward holds an fp32 query-gradient accumulator while it runs."""

    @staticmethod
    def forward(ctx, q, k, v, scale, tracker):
        # q: [b, h, s, hd]; k, v: [b, kvh, s, hd] -> [b, h, s, hd]
        with tracker.paused():
            out = q.new_empty(q.shape) if q.is_meta else F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        tracker.track(out)
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [b, h, s], tracked by the dispatch mode
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.scale, ctx.tracker = scale, tracker
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp = ctx.saved_tensors
        tracker = ctx.tracker
        accumulator = q.new_empty(q.shape, dtype=torch.float32)  # the kernel's fp32 dq accumulator
        groups = q.shape[1] // k.shape[1]
        expanded = [q.new_empty(q.shape) for _ in range(2)] if groups > 1 else []  # dk, dv per query head
        with tracker.paused():
            if q.is_meta:
                grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
            else:
                with torch.enable_grad():
                    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
                    recomputed = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=ctx.scale,
                                                                enable_gqa=groups > 1)
                    grads = torch.autograd.grad(recomputed, inputs, grad_out)
        for grad in grads:
            tracker.track(grad)
        tracker.update_peak()
        del accumulator, expanded
        return (*grads, None, None)


# scaled_dot_product_attention's parameters, in order
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class FusedKernels(TorchFunctionMode):
    """Routes unmasked causal SDPA through :class:`_FlashAttention`; on meta tensors, makes boolean
    gathers keep every row (see the module docstring)."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = dict(zip(_SDPA_ARGS, args), **kwargs)
            if call.get("attn_mask") is None and call.get("is_causal") and not call.get("dropout_p"):
                return _FlashAttention.apply(call["query"], call["key"], call["value"], call.get("scale"),
                                             self.tracker)
        if func is torch.Tensor.__getitem__ and _is_meta_bool_gather(args):
            source, mask = args
            rows = source.flatten(0, mask.dim() - 1)  # [numel(mask), ...]: every position kept
            return rows.index_select(0, torch.arange(rows.shape[0], device=rows.device))
        return func(*args, **kwargs)


def _is_meta_bool_gather(args) -> bool:
    return (len(args) == 2 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
            and args[0].is_meta)


@contextlib.contextmanager
def offloaded_to_host(tracker: MemoryTracker, enabled: bool) -> Iterator[None]:
    """Tensors autograd saves (outside checkpointed layers; parameters stay) leave device memory
    for host memory until backward uses them, as ``save_on_cpu`` does; values are kept exactly."""
    if not enabled:
        yield
        return

    def pack(tensor: torch.Tensor):
        if isinstance(tensor, torch.nn.Parameter) or is_nf4(tensor):
            return tensor
        with tracker.paused():
            host = tensor.detach().clone()  # stands for the pinned host copy
        nbytes = _rounded(host.untyped_storage().nbytes())
        tracker.add_host_bytes(nbytes)
        weakref.finalize(host.untyped_storage(), tracker.add_host_bytes, -nbytes)
        return host, tensor.requires_grad

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, _ = packed
        return host.clone()  # the copy back to the device, tracked as a backward temporary

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
