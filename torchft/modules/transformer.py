"""The decoder layer and the decoder-only transformer."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchft.modules.attention import AttentionMask, GroupedQueryAttention
from torchft.modules.kv_cache import KVCache
from torchft.modules.recompute import can_recompute_when_saved, recompute_when_saved
from torchft.modules.rope import RotaryEmbedding


class TransformerDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + mlp(norm(h))``.

    The norms' outputs are not kept for backward (the projections after them would keep them): they
    are recomputed from the norms' inputs, which the norms keep anyway. ``recompute_norms = False``
    turns that off (activation checkpointing recomputes the whole layer instead).
    """

    def __init__(self, self_attn: GroupedQueryAttention, mlp: nn.Module,
                 input_layernorm: nn.Module, post_attention_layernorm: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.recompute_norms = True

    def _after_norm(self, norm: nn.Module, block, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``block(norm(x), ...)`` with the norm's output stored, where it is saved, as ``x``."""
        normed = norm(x)
        if (not self.recompute_norms or not normed.requires_grad or torch.compiler.is_compiling()
                or not can_recompute_when_saved()):
            return block(normed, *args, **kwargs)
        with recompute_when_saved(normed, norm, x):
            return block(normed, *args, **kwargs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask = None) -> torch.Tensor:
        # x: [b, s, dim] -> [b, s, dim]
        h = x + self._after_norm(self.input_layernorm, self.self_attn, x, cos, sin, mask=mask)
        return h + self._after_norm(self.post_attention_layernorm, self.mlp, h)


class TransformerDecoder(nn.Module):
    """Token embedding, a stack of decoder layers, a final norm and the output projection.

    ``lm_head=None`` ties the output projection to ``embed_tokens.weight`` (Llama 3.2 1B/3B); the
    state dict then has no ``lm_head.weight``, as in Hugging Face checkpoints of tied models.

    Calls:
        ``model(tokens)`` -> logits [b, s, vocab] (causal attention, positions 0..s-1).
        ``model(tokens, mask=m, input_pos=p)`` for packed batches (block-causal ``m`` [b, s, s],
        per-document positions ``p`` [b, s]) and decoding with the KV cache.
        ``model.hidden_states(...)`` then ``model.output(h)`` for losses that never hold full logits.
    """

    def __init__(self, embed_tokens: nn.Embedding, layers: nn.ModuleList, norm: nn.Module,
                 rope: RotaryEmbedding, lm_head: Optional[nn.Module] = None, max_seq_len: int = 4096) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.rope = rope
        if lm_head is not None:
            self.lm_head = lm_head
        self.max_seq_len = max_seq_len

    @property
    def tied_output(self) -> bool:
        return not hasattr(self, "lm_head")

    # ---- KV cache -------------------------------------------------------------------------------
    def setup_caches(self, batch_size: int, dtype: torch.dtype, max_seq_len: Optional[int] = None) -> None:
        """Allocates a static KV cache in every layer on the model's device."""
        device = self.embed_tokens.weight.device
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, max_seq_len or self.max_seq_len, attn.num_kv_heads,
                                    attn.head_dim, dtype, device)

    def caches_are_enabled(self) -> bool:
        return self.layers[0].self_attn.kv_cache is not None

    def reset_caches(self) -> None:
        """Empties the caches (a new sequence starts) without freeing them."""
        for layer in self.layers:
            if layer.self_attn.kv_cache is not None:
                layer.self_attn.kv_cache.reset()

    def clear_caches(self) -> None:
        """Frees the caches; the model goes back to full-sequence (training) mode."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    # ---- forward --------------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, *, mask: AttentionMask = None,
                      input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: [b, s] long -> final-normed hidden states [b, s, dim]."""
        b, s = tokens.shape
        if input_pos is None:
            start = self.layers[0].self_attn.kv_cache._size if self.caches_are_enabled() else 0
            input_pos = (torch.arange(s, device=tokens.device) + start).expand(b, s)
        h = self.embed_tokens(tokens)  # [b, s, dim]
        cos, sin = self.rope(input_pos, dtype=h.dtype)  # [b, s, head_dim] each, shared by all layers
        for layer in self.layers:
            h = layer(h, cos, sin, mask=mask)
        return self.norm(h)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., dim] -> logits [..., vocab]."""
        if self.tied_output:
            return F.linear(h, self.embed_tokens.weight)
        return self.lm_head(h)

    def forward(self, tokens: torch.Tensor, *, mask: AttentionMask = None,
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: [b, s] long -> logits [b, s, vocab]."""
        return self.output(self.hidden_states(tokens, mask=mask, input_pos=input_pos))
