"""Activation memory: checkpointing (recompute in backward) and offloading (keep on the CPU).

Both are applied to an already-built model from the outside: the models never import training code.
"""
import contextlib
import os
import weakref
from typing import Optional

import torch
from torch import nn


def apply_activation_checkpointing(model: nn.Module, layer_cls: type[nn.Module] | None = None) -> int:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Every module of type ``layer_cls`` (default: ``TransformerDecoderLayer``) keeps only its input
    for backward. The module tree and the state-dict keys do not change (the composable
    ``checkpoint`` works through hooks, not a wrapper module), so saving, adapters and
    ``torch.compile`` see the same names. Returns the number of layers wrapped.
    """
    from torch.distributed._composable import checkpoint

    if layer_cls is None:
        from torchft.modules.transformer import TransformerDecoderLayer

        layer_cls = TransformerDecoderLayer
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    if not layers:
        raise ValueError(f"activation checkpointing found no {layer_cls.__name__} in the model")
    for layer in layers:
        checkpoint(layer)
        for module in layer.modules():  # the whole layer is recomputed: no partial recompute inside
            for flag in ("recompute_product", "recompute_norms"):
                if hasattr(module, flag):
                    setattr(module, flag, False)
    return len(layers)


def apply_tiled_mlp(model: nn.Module, tile_tokens: int) -> int:
    """Run every SwiGLU block in sequence tiles of ``tile_tokens``, recomputed in backward.

    For long sequences: the ``[seq, intermediate]`` projections then exist one tile at a time, in
    forward and in backward, with values and gradients equal to the untiled block. Returns the
    number of blocks changed.
    """
    from torchft.modules.feed_forward import FeedForward

    if tile_tokens < 1:
        raise ValueError(f"mlp tile_tokens ({tile_tokens}) must be >= 1")
    blocks = [m for m in model.modules() if isinstance(m, FeedForward)]
    for block in blocks:
        block.tile_tokens = tile_tokens
    return len(blocks)


def available_host_bytes() -> int:
    """Host RAM that can still be allocated (``MemAvailable``; total RAM where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def offload_host_bytes(num_layers: int, batch_size: int, seq_len: int, dim: int,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Host bytes that offloading the checkpointed layer inputs of one micro-batch takes
    (one [batch, seq, dim] tensor per decoder layer, plus the final norm's input)."""
    return (num_layers + 1) * batch_size * seq_len * dim * torch.empty((), dtype=dtype).element_size()


def cached_pinned_host_bytes() -> int:
    """Pinned host bytes that CUDA's caching host allocator holds free for reuse (0 without CUDA).

    A freed pinned buffer stays allocated and locked (so it is not in ``MemAvailable``) until a later
    pinned allocation reuses it: from the second step on, offloading mostly reuses these.
    """
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return 0
    stats = torch.cuda.host_memory_stats()
    if "active_bytes.current" in stats:  # "allocated" = handed out + cached, "active" = handed out
        return max(0, stats.get("allocated_bytes.current", 0) - stats["active_bytes.current"])
    # older releases: "reserved" = handed out + cached, "allocated" = handed out
    return max(0, stats.get("reserved_bytes.current", 0) - stats.get("allocated_bytes.current", 0))


def new_host_buffer(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A flat ``[numel]`` host tensor (pinned memory comes from CUDA's caching host allocator)."""
    return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=pinned)


def check_host_memory(needed_bytes: int, what: str = "activation offloading",
                      available: Optional[int] = None) -> None:
    """Raise a one-line ``MemoryError`` when ``needed_bytes`` exceed ``available`` host bytes
    (default: the available host RAM)."""
    available = available_host_bytes() if available is None else available
    if needed_bytes > available:
        raise MemoryError(
            f"{what} needs {needed_bytes / 2**30:.1f} GiB of host RAM but {available / 2**30:.1f} GiB are "
            "available: lower batch_size or the sequence length, or set enable_activation_offloading=false")


OFFLOAD_NEEDS_CUDA = "enable_activation_offloading needs device=cuda (activations are offloaded from GPU to CPU)"


def check_offload_host_memory(enabled: bool, device: torch.device | str, *, num_layers: int, batch_size: int,
                              seq_len: int | None, dim: int, dtype: torch.dtype, ranks_on_host: int = 1,
                              available: Optional[int] = None) -> int:
    """Before the first step: refuse activation offloading off CUDA, and refuse it when the host RAM
    that one micro-batch's offloaded layer inputs take on every rank of this machine
    (``ranks_on_host`` x :func:`offload_host_bytes`) is more than is available. One line naming both
    figures, instead of a machine that swaps or a process the kernel kills mid-run. Returns the bytes
    needed (0 when not enabled or ``seq_len`` is unknown)."""
    from torchft.config import ConfigError

    if not enabled:
        return 0
    if torch.device(device).type != "cuda":
        raise ConfigError(OFFLOAD_NEEDS_CUDA)
    if not seq_len:
        return 0
    needed = ranks_on_host * offload_host_bytes(num_layers, batch_size, seq_len, dim, dtype)
    what = (f"activation offloading ({num_layers + 1} layer inputs of {batch_size} x {seq_len} tokens x {dim} "
            f"x {torch.empty((), dtype=dtype).element_size()} bytes, on {ranks_on_host} rank(s) of this machine)")
    check_host_memory(needed, what, available)
    return needed


class _Offloaded:
    """One saved storage's host copy and, during backward, its copy back on the device."""

    def __init__(self, source: torch.Tensor, host: torch.Tensor, copied: Optional["torch.cuda.Event"]):
        self.source = weakref.ref(source)  # identifies the storage while its tensor lives
        self.host, self.copied = host, copied
        self.device_copy: Optional[torch.Tensor] = None
        self.device_ready: Optional["torch.cuda.Event"] = None
        self.previous: Optional["_Offloaded"] = None  # packed just before: unpacked just after


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep large saved activations in (pinned) host memory.

    Meant for activation checkpointing, where what autograd keeps is each decoder layer's input:
    those are copied to the host on a side CUDA stream while the next layer computes, and in
    backward each layer's input is copied back while the layer after it (in backward order) is
    recomputed, so copies overlap compute instead of stalling it. Small tensors, integer tensors
    and parameters stay where they are; a storage saved several times is copied once. Before a new
    host buffer is allocated the available host RAM is checked (a clear ``MemoryError`` instead of
    a swapping machine); freed pinned buffers that CUDA keeps cached for reuse count as available.

    Args:
        device: the training device; on a CPU "host copies" are plain copies (for tests).
        min_bytes: storages smaller than this stay on the device.
    """

    def __init__(self, device: torch.device | str, min_bytes: int = 1 << 20) -> None:
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self.on_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.offloaded_bytes = 0  # host bytes held by this forward's copies
        self._by_storage: dict[int, _Offloaded] = {}
        self._last: Optional[_Offloaded] = None
        # Autograd calls the hooks while a compiled layer runs; left to the compiler they would be
        # traced, and their stream calls (record_stream) cannot be compiled: they always run eagerly.
        super().__init__(torch.compiler.disable(self._pack), torch.compiler.disable(self._unpack))

    def __enter__(self):
        self._by_storage, self._last, self.offloaded_bytes = {}, None, 0
        return super().__enter__()

    def _pack(self, t: torch.Tensor):
        # parameters, views of them (a transposed weight) and tensor subclasses (NF4) stay where they are
        if (type(t) is not torch.Tensor or isinstance(t._base, nn.Parameter) or t.device != self.device
                or not t.is_floating_point()):
            return t
        storage = t.untyped_storage()
        if storage.nbytes() < self.min_bytes:
            return t
        entry = self._by_storage.get(storage.data_ptr())
        if entry is None or entry.source() is None or entry.source().untyped_storage().data_ptr() != storage.data_ptr():
            entry = self._offload(t)
        return entry, t.size(), t.stride(), t.storage_offset()

    def _offload(self, t: torch.Tensor) -> _Offloaded:
        storage = t.untyped_storage()
        whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage)  # [storage elements], flat
        # This forward may use what it holds already, free RAM, and the freed pinned buffers the
        # allocator keeps for reuse (locked: not in MemAvailable, but free for this copy).
        free = available_host_bytes() + cached_pinned_host_bytes()
        check_host_memory(self.offloaded_bytes + storage.nbytes(), available=self.offloaded_bytes + free)
        host = new_host_buffer(whole.numel(), t.dtype, pinned=self.on_cuda)
        copied = None
        if self.on_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
            with torch.cuda.stream(self.stream):
                host.copy_(whole, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            whole.record_stream(self.stream)  # the device memory is not reused before the copy ends
        else:
            host.copy_(whole)
        entry = _Offloaded(t, host, copied)
        entry.previous, self._last = self._last, entry
        self._by_storage[storage.data_ptr()] = entry
        self.offloaded_bytes += storage.nbytes()
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Start copying ``entry`` back to the device (on the side stream)."""
        if entry.device_copy is not None:
            return
        if not self.on_cuda:
            entry.device_copy = entry.host.clone()
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(entry.copied)
            entry.device_copy = entry.host.to(self.device, non_blocking=True)
            entry.device_ready = torch.cuda.Event()
            entry.device_ready.record(self.stream)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        entry, size, stride, offset = packed
        self._fetch(entry)
        if entry.previous is not None:  # overlap: the next one backward needs
            self._fetch(entry.previous)
        whole, entry.device_copy = entry.device_copy, None
        if self.on_cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.device_ready)
            whole.record_stream(current)
        return whole.as_strided(size, stride, offset)


_offloaders: dict[torch.device, OffloadActivations] = {}

# Storages smaller than this stay on the device (the copy is not worth it); read at every use, so a
# changed value (tests of tiny models) applies to the per-device offloader that is kept.
OFFLOAD_MIN_BYTES = 1 << 20


def activation_offloading(enabled: bool, device: torch.device | str):
    """A context manager that keeps the large tensors saved for backward in pinned CPU memory
    (:class:`OffloadActivations`), or does nothing when not ``enabled``.

    Use it around the model's forward pass, not the loss (the loss keeps no activation worth a
    copy). Meant together with activation checkpointing, which leaves only the layer inputs to
    move; only meaningful on CUDA.
    """
    if not enabled:
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(OFFLOAD_NEEDS_CUDA)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _offloaders:  # one side stream per device for the whole run
        _offloaders[device] = OffloadActivations(device)
    _offloaders[device].min_bytes = OFFLOAD_MIN_BYTES
    return _offloaders[device]
