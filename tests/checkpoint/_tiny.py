"""Tiny random transformers Llama models (fp32, CPU) saved in the HF and Meta layouts for checkpoint tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.models._hf_reference import VARIANTS as _REFERENCE_VARIANTS, tiny_hf_llama

# Each variant changes what a conversion could get wrong: RoPE base, GQA, scaled RoPE, tying, head_dim,
# biases. Meta's format has no biases, so its tests take the others.
VARIANTS = _REFERENCE_VARIANTS
META_VARIANTS = {name: v for name, v in VARIANTS.items() if name != "biases"}
VOCAB = 96
SEQ = 40


def tiny_hf_model(variant: str = "llama3", seed: int = 0):
    """A random fp32 ``LlamaForCausalLM``: dim 64, 2 layers, 4 heads (random norms too)."""
    return tiny_hf_llama(variant, seed, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2)


def write_support_files(folder: Path) -> None:
    """Tokenizer / generation files as found in a downloaded model folder (content is irrelevant here)."""
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    (folder / "original").mkdir(exist_ok=True)
    (folder / "original" / "tokenizer.model").write_bytes(b"\x00tiktoken-bytes")


def save_hf_folder(variant: str, folder: Path, seed: int = 0, **save_kwargs):
    """``save_pretrained`` a tiny model (+ tokenizer files) into ``folder``; returns the HF model."""
    model = tiny_hf_model(variant, seed)
    model.save_pretrained(folder, **save_kwargs)
    write_support_files(folder)
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """max |diff| <= 1e-5 x the logits' scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=0)


# ---- Meta layout, written here independently of torchft.checkpoint.meta ----------------------------
def hf_rows_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Row gather by definition: within a head, interleaved row 2j is rotate-half row j and row 2j+1
    is rotate-half row j + head_dim/2."""
    head_dim = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        for j in range(head_dim // 2):
            order += [h * head_dim + j, h * head_dim + j + head_dim // 2]
    return w[torch.tensor(order)]


META_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def save_meta_folder(hf_model, folder: Path, *, llama2_style_vocab: bool = False) -> dict[str, torch.Tensor]:
    """Write ``consolidated.00.pth`` + ``params.json`` for ``hf_model`` as Meta publishes them."""
    cfg = hf_model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = hf_model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}  # Meta stores the output even for tied models
    for i in range(cfg.num_hidden_layers):
        for hf_name, meta_name in META_NAMES.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                w = hf_rows_to_meta_rows(w, n_heads)
            elif hf_name == "self_attn.k_proj":
                w = hf_rows_to_meta_rows(w, n_kv)
            out[f"layers.{i}.{meta_name}.weight"] = w.clone()
    if llama2_style_vocab:
        out["rope.freqs"] = torch.zeros(cfg.head_dim // 2)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(out, folder / "consolidated.00.pth")
    # intermediate 128 = multiple_of 32 * ceil(int(0.75 * int(2 * 4 * 64 / 3)) / 32)
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": -1 if llama2_style_vocab else cfg.vocab_size, "multiple_of": 32,
              "ffn_dim_multiplier": 0.75, "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"]}
    if cfg.head_dim != cfg.hidden_size // n_heads:
        params["head_dim"] = cfg.head_dim
    scaling = cfg.rope_parameters
    if scaling.get("rope_type") == "llama3":
        params.update(use_scaled_rope=True, rope_original_max_position_embeddings=scaling["original_max_position_embeddings"])
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(b"\x00sentencepiece-bytes")
    return out
