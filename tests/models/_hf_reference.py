"""Tiny random transformers Llama models used as the reference in model tests."""
import copy

import torch

VARIANTS = {
    # Llama 2 style: theta 1e4, no scaling, multi-head, untied.
    "llama2": dict(num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama 3: theta 5e5, grouped-query attention.
    "llama3": dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama 3.1: scaled RoPE (original context small so the scaling bites inside short sequences).
    "llama3_1": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Llama 3.2: tied embeddings.
    "llama3_2": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Biases on every attention and MLP projection (attention_bias / mlp_bias configs).
    "biases": dict(num_key_value_heads=2, rope_theta=10000.0, attention_bias=True, mlp_bias=True,
                   tie_word_embeddings=False),
    # head_dim set explicitly, not hidden_size / heads.
    "odd_head_dim": dict(num_key_value_heads=2, head_dim=24, rope_theta=10000.0, tie_word_embeddings=False),
}


def tiny_hf_llama(variant: str, seed: int = 0, vocab_size: int = 128, **config_overrides):
    """A random fp32 ``LlamaForCausalLM``: dim 64, 2 layers, 4 heads (``config_overrides`` on top)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    fields.update(copy.deepcopy(VARIANTS[variant]))  # LlamaConfig edits rope dicts in place
    fields.update(config_overrides)
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config).eval()
    # Random norms too, so a norm-weight mix-up cannot hide behind all-ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_to_torchft_keys(state_dict: dict, tied: bool = False) -> dict:
    """transformers keys -> torchft keys (strip the ``model.`` prefix; a tied lm_head is no key of ours)."""
    return {k.removeprefix("model."): v for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
