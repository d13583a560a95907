"""Static-shape key/value cache for incremental decoding."""
import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated to ``max_seq_len`` so every decode step has the
    same shapes (what ``torch.compile`` wants).

    Writes go to the next free slots (``size`` onwards); a step of ``s`` tokens fills ``s`` slots.
    The slot a token occupies is independent of its RoPE position, so left-padded batches work:
    their positions come through ``input_pos`` and their padding is hidden by the attention mask.

    Buffers: ``k_cache`` / ``v_cache`` [batch, num_kv_heads, max_seq_len, head_dim].
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Slot indices [max_seq_len]; the first ``size`` are filled. Kept as a tensor so the update is
        # a fixed-shape index_copy under compile.
        self.register_buffer("slots", torch.arange(max_seq_len, device=device), persistent=False)
        self.register_buffer("_size", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # Slots filled by eager (uncompiled) updates, counted on the host so the overflow check never
        # reads ``_size`` back from the device (one sync per layer per token otherwise).
        self._eager_size = 0
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len

    @property
    def size(self) -> int:
        """Number of filled slots (reads the device counter: a sync, so not for the decode loop)."""
        return int(self._size.item())

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        self._size.zero_()
        self._eager_size = 0

    def causal_mask(self, seq_len: int) -> torch.Tensor:
        """Bool mask [s, max_seq_len] for the next ``seq_len`` tokens: each sees the filled slots and
        itself, no later slot. Computed from the size tensor, so no host sync."""
        query_slots = self._size + self.slots[:seq_len]  # [s]
        return self.slots[None, :] <= query_slots[:, None]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [b, num_kv_heads, s, head_dim] -> the whole caches [b, num_kv_heads, max_seq_len, head_dim]."""
        seq_len = k.shape[2]
        if k.shape[0] != self.batch_size:  # static shapes: a smaller batch would silently mix rows
            raise ValueError(f"KV cache was set up for batch size {self.batch_size}, got {k.shape[0]}")
        if not torch.compiler.is_compiling():
            # Compiled steps skip the check (their caller sizes the cache, as generate does).
            if self._eager_size + seq_len > self.max_seq_len:
                raise ValueError(
                    f"KV cache holds {self.max_seq_len} positions; {self._eager_size} are filled and "
                    f"{seq_len} more do not fit"
                )
            self._eager_size += seq_len
        write = self._size + self.slots[:seq_len]  # [s]
        self.k_cache.index_copy_(2, write, k)
        self.v_cache.index_copy_(2, write, v)
        self._size.add_(seq_len)
        return self.k_cache, self.v_cache
