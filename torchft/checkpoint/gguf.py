"""Export an HF step folder to one GGUF file (llama.cpp, Ollama), written with the ``gguf`` package.

The file holds architecture ``llama`` with llama.cpp's tensor names, every hyperparameter llama.cpp reads
(context length, heads, kv heads, rope base, RMS eps, Llama 3.1 rope scaling as ``rope_freqs.weight``), the
tokenizer (Llama 3 byte-level BPE as ``gpt2`` with tokens/merges/types, Llama 2 sentencepiece as ``llama``
with scores/types), the special-token ids and the chat template. An adapter step folder holds the merged
model beside ``adapter/``; that merged model is what is exported.

Weights: q/k projections are permuted from the HF rotate-half layout to llama.cpp's interleaved one; norms
stay f32; the rest is f16, bf16 or q8_0 (blocks of 32 with one f16 scale, llama.cpp's own quantizer).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from torchft.checkpoint._io import atomic_file, require_dir

DTYPES = ("f16", "bf16", "q8_0")
# Largest |logit difference| between an export and its source model, relative to the largest |logit|
# (f16/bf16: rounding; q8_0: 8-bit blocks). docs/export.md's table; tests/checkpoint/test_gguf.py checks it
# with transformers, benchmarks/bench_gguf_llamacpp.py with llama.cpp.
LOGIT_TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}

# torchft key (after "layers.N.") -> llama.cpp tensor name (after "blk.N.").
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_tensor_name(key: str) -> str:
    """llama.cpp's name for a torchft key: ``layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"{key}: no llama.cpp tensor name for this weight (only Llama weights without biases export)")


def interleave_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k rows from the HF rotate-half order (per head: all first halves, then all second halves) to the
    interleaved pairs llama.cpp rotates. ``weight``: [num_heads * head_dim, in]."""
    out_dim = weight.shape[0]
    return weight.reshape(num_heads, 2, out_dim // num_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(head_dim: int, rope_base: float, scaling: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp applies for Llama 3.1 rope scaling (``rope_freqs.weight``)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / rope_base ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _check_llama(config: dict, where: Path) -> None:
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{where}: model_type {model_type!r} is not 'llama'; GGUF export supports Llama models")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{where}: attention/MLP biases do not export to llama.cpp's llama architecture")


def _tensor_data(name: str, tensor: torch.Tensor, dtype: str):
    """(numpy data, GGML type) for one tensor: 1-D tensors f32, matrices in ``dtype``."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1:
        return data, gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if dtype == "q8_0" and data.shape[-1] % 32:
        raise ValueError(f"{name}: q8_0 needs rows of a multiple of 32 values, this one has {data.shape[-1]}")
    return gguf.quants.quantize(data, kind), kind


def _write_hparams(writer, args, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.embed_dim)
    writer.add_block_count(args.num_layers)
    writer.add_feed_forward_length(args.intermediate_dim)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_base)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)


def _write_tensors(writer, state_dict, args, dtype: str) -> None:
    for key, tensor in state_dict.items():
        if key.endswith("self_attn.q_proj.weight"):
            tensor = interleave_rotary(tensor, args.num_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            tensor = interleave_rotary(tensor, args.num_kv_heads)
        name = gguf_tensor_name(key)
        data, kind = _tensor_data(name, tensor, dtype)
        writer.add_tensor(name, data, raw_dtype=kind)
    scaling = args.rope_scaling
    if scaling is not None and scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(args.head_dim, args.rope_base, scaling))


def export_gguf(checkpoint_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write the Llama model of an HF folder (a step folder) as one GGUF file.

    Args:
        checkpoint_dir: ``config.json``, safetensors weights and the tokenizer (``tokenizer.json`` or Meta's
            ``tokenizer.model``); a LoRA step folder exports its merged weights.
        output: the ``.gguf`` file to write. It is written under a temporary name and renamed into place,
            so a failed export leaves nothing at ``output``.
        dtype: ``f16``, ``bf16`` or ``q8_0`` for the matrices (norms stay f32).

    Returns:
        ``output`` as a Path.
    """
    import gguf

    from torchft.checkpoint.gguf_vocab import write_vocab
    from torchft.checkpoint.hf import load_hf_args, load_hf_checkpoint, read_hf_config

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = require_dir(checkpoint_dir, "checkpoint_dir")
    _check_llama(read_hf_config(folder), folder / "config.json")
    args = load_hf_args(folder)
    writer_vocab = write_vocab(folder, args.vocab_size)  # checks the tokenizer before the weights are read
    state_dict = load_hf_checkpoint(folder)
    if args.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # llama.cpp reuses token_embd without an output tensor
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give the .gguf file to write")
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _write_hparams(writer, args, folder.resolve().name)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        writer_vocab(writer)
        _write_tensors(writer, state_dict, args, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output


__all__ = ["DTYPES", "LOGIT_TOLERANCE", "export_gguf", "gguf_tensor_name", "interleave_rotary", "llama3_rope_factors"]
