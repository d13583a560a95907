"""The Meta format: ``consolidated.00.pth`` + ``params.json`` as published by Meta.

Meta's attention applies RoPE to interleaved pairs (x0, x1), (x2, x3)... while torchft (like
transformers) rotates halves (x_i, x_{i + d/2}). The rows of ``wq``/``wk`` are permuted between the
two layouts on load and back on save; every other tensor is only renamed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from torchft.checkpoint._io import (
    CheckpointError,
    atomic_directory,
    copy_support_files,
    refuse_nested_output,
    require_dir,
    to_plain_tensor,
)
from torchft.checkpoint.validate import check_state_dict, expected_shapes, is_adapter_key

PARAMS_FILE = "params.json"
CONSOLIDATED_FILE = "consolidated.00.pth"

# Meta name pattern -> torchft name pattern ({} is the layer index).
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
_IGNORED_META_KEYS = ("rope.freqs",)  # a precomputed buffer in Llama 2 files; recomputed by the model

# Meta's Llama 3.1+ RoPE scaling constants (its reference code hard-codes them).
_META_LOW_FREQ, _META_HIGH_FREQ, _META_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def meta_to_torchft_key(key: str) -> str | None:
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if match and match.group(2) in _LAYER_KEYS:
        return f"layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}"
    return None


def torchft_to_meta_key(key: str) -> str | None:
    for meta, ours in _TOP_KEYS.items():
        if key == ours:
            return meta
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if match:
        for meta, ours in _LAYER_KEYS.items():
            if match.group(2) == ours:
                return f"layers.{match.group(1)}.{meta}"
    return None


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from Meta's interleaved RoPE layout to rotate-half.

    w: [n_heads * head_dim, in]. Within a head, output rows (0, 1, 2, 3, ...) pair as (0,1), (2,3)...
    in Meta's layout; rotate-half pairs row i with row i + head_dim/2, so rows are regrouped as all
    even rows then all odd rows.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``interleaved_to_rotate_half``."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4*dim, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---------------------------------------------------------------------------------------------------
# params.json <-> config


def read_meta_params(checkpoint_dir: str | os.PathLike) -> dict:
    """The parsed ``params.json``; errors name the file."""
    path = require_dir(checkpoint_dir) / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params.json not found")
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable params.json ({err})") from err
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: params.json must hold a JSON object")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int):
            raise CheckpointError(f"{path}: params.json needs an integer '{key}'")
    return params


def meta_params_to_hf_config(
    params: Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_seq_len: int | None = None,
) -> dict:
    """A transformers-style Llama ``config.json`` dict for ``params.json`` values.

    ``vocab_size`` fills in Llama 2's ``"vocab_size": -1``. Meta's files do not record the context
    length; ``max_seq_len`` (else ``params["max_seq_len"]``) defaults to 131072 with scaled RoPE,
    8192 for rope_theta >= 500000 and 4096 otherwise. With ``use_scaled_rope`` the factor is
    ``params["rope_scaling_factor"]`` when present, else 32 for tied models (Llama 3.2 1B/3B) and 8
    otherwise (Llama 3.1 / 3.3).
    """
    dim, n_heads = params["dim"], params["n_heads"]
    theta = float(params.get("rope_theta", 10000.0))
    scaled = bool(params.get("use_scaled_rope", False))
    if vocab_size is None or params.get("vocab_size", -1) > 0:
        vocab_size = params.get("vocab_size", vocab_size)
    if max_seq_len is None:
        max_seq_len = params.get("max_seq_len") or (131072 if scaled else 8192 if theta >= 500000 else 4096)
    rope_scaling = None
    if scaled:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(params.get("rope_scaling_factor", 32.0 if tie_word_embeddings else 8.0)),
            "low_freq_factor": float(params.get("rope_low_freq_factor", _META_LOW_FREQ)),
            "high_freq_factor": float(params.get("rope_high_freq_factor", _META_HIGH_FREQ)),
            "original_max_position_embeddings": int(
                params.get("rope_original_max_position_embeddings", _META_ORIGINAL_CONTEXT)
            ),
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": params.get("head_dim", dim // n_heads),
        "intermediate_size": meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        "vocab_size": vocab_size,
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_seq_len,
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _rope_settings(config: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(theta, llama3 scaling dict or None) from either config shape (rope_theta/rope_scaling or rope_parameters)."""
    rope = config.get("rope_parameters") or {}
    theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", None):
        raise CheckpointError(f"rope scaling type {scaling.get('rope_type')!r} has no Meta-format equivalent")
    return theta, scaling


def hf_config_to_meta_params(config: Mapping[str, Any]) -> dict:
    """``params.json`` values for a Llama config dict (``args.to_hf_config()``).

    ``multiple_of`` / ``ffn_dim_multiplier`` are chosen so Meta's formula gives back
    ``intermediate_size`` exactly (Meta's published pairs are tried first).
    """
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    theta, scaling = _rope_settings(config)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError("the Meta format has no bias tensors (attention_bias/mlp_bias must be false)")
    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
              "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"]}
    params.update(_ffn_params(dim, config["intermediate_size"]))
    params.update({"norm_eps": float(config.get("rms_norm_eps", 1e-5)), "rope_theta": theta,
                   "use_scaled_rope": scaling is not None})
    head_dim = config.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        params["head_dim"] = head_dim
    if scaling is not None:
        tied = bool(config.get("tie_word_embeddings", False))
        if float(scaling["factor"]) != (32.0 if tied else 8.0):
            params["rope_scaling_factor"] = float(scaling["factor"])
        for key, meta_key, default in (
            ("low_freq_factor", "rope_low_freq_factor", _META_LOW_FREQ),
            ("high_freq_factor", "rope_high_freq_factor", _META_HIGH_FREQ),
            ("original_max_position_embeddings", "rope_original_max_position_embeddings", _META_ORIGINAL_CONTEXT),
        ):
            if scaling.get(key, default) != default:
                params[meta_key] = scaling[key]
    return params


def _ffn_params(dim: int, intermediate_size: int) -> dict:
    for multiple_of in (256, 1024, 4096):
        for multiplier in (None, 1.3, 1.5, 1.0, 1.2):
            if meta_ffn_dim(dim, multiple_of, multiplier) == intermediate_size:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    # Always exact: with multiple_of = intermediate_size the formula rounds any hidden <= it up to it.
    hidden = int(2 * (4 * dim) / 3)
    multiplier = None if hidden <= intermediate_size else intermediate_size / hidden
    return {"multiple_of": intermediate_size, "ffn_dim_multiplier": multiplier}


# ---------------------------------------------------------------------------------------------------
# loading


def consolidated_file(folder: str | os.PathLike) -> Path:
    """The one ``consolidated.*.pth`` of a Meta folder; errors name the folder and the rule."""
    folder = Path(folder)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder / CONSOLIDATED_FILE}: no consolidated.*.pth file found")
    if len(files) > 1:
        raise CheckpointError(
            f"{folder}: {len(files)} consolidated.*.pth files (model-parallel shards) are not supported; "
            "merge them into one consolidated.00.pth first"
        )
    return files[0]


def _read_consolidated(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable PyTorch file, truncated or corrupt ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return data


def load_meta_args(checkpoint_dir: str | os.PathLike, *, max_seq_len: int | None = None):
    """``LlamaArgs`` for a Meta folder (``params.json``, with vocab size and tying read off the weights).

    The model is tied when ``output.weight`` is absent or equal to ``tok_embeddings.weight``.
    """
    from torchft.models import LlamaArgs

    folder = require_dir(checkpoint_dir)
    params = read_meta_params(folder)
    weights = _read_consolidated(consolidated_file(folder))
    return LlamaArgs.from_hf_config(meta_params_to_hf_config(
        params, vocab_size=_vocab_size(weights), tie_word_embeddings=_is_tied(weights), max_seq_len=max_seq_len))


def _vocab_size(weights: Mapping[str, torch.Tensor]) -> int | None:
    emb = weights.get("tok_embeddings.weight")
    return emb.shape[0] if emb is not None else None


def _is_tied(weights: Mapping[str, torch.Tensor]) -> bool:
    emb, out = weights.get("tok_embeddings.weight"), weights.get("output.weight")
    if out is None:
        return emb is not None
    return emb is not None and emb.shape == out.shape and torch.equal(emb, out)


def load_meta_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    expected: Any = None,
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """Load ``consolidated.00.pth`` (memory-mapped) as a torchft state dict, q/k permuted to rotate-half.

    ``expected`` (``LlamaArgs`` or a meta model) defaults to ``load_meta_args(checkpoint_dir)`` when
    ``validate`` is set; keys and shapes are checked before anything is returned. For a tied model
    ``output.weight`` is dropped (the output reuses ``embed_tokens.weight``).
    """
    folder = require_dir(checkpoint_dir)
    path = consolidated_file(folder)
    params = read_meta_params(folder)
    raw = _read_consolidated(path)
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads

    renamed: dict[str, torch.Tensor] = {}
    meta_names: dict[str, str] = {}
    for key, tensor in raw.items():
        if key in _IGNORED_META_KEYS:
            continue
        new_key = meta_to_torchft_key(key)
        if new_key is None:
            raise CheckpointError(f"{path}: unexpected key {key} (not a Llama weight)")
        renamed[new_key], meta_names[new_key] = tensor, key

    if expected is None and validate:
        expected = load_meta_args(folder)
    if expected is not None:
        want = expected_shapes(expected)
        if "lm_head.weight" in renamed and "lm_head.weight" not in want:
            del renamed["lm_head.weight"]
        names = {k: meta_names.get(k) or torchft_to_meta_key(k) or k for k in {*want, *renamed}}
        check_state_dict(renamed, want, sources={k: path for k in renamed}, where=path, key_names=names)

    for key in renamed:
        if key.endswith("self_attn.q_proj.weight"):
            renamed[key] = interleaved_to_rotate_half(renamed[key], n_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            renamed[key] = interleaved_to_rotate_half(renamed[key], n_kv_heads)
    return renamed


# ---------------------------------------------------------------------------------------------------
# saving


def write_meta_weights(state_dict: Mapping[str, torch.Tensor], folder: Path, params: Mapping[str, Any]) -> None:
    """Write ``consolidated.00.pth`` + ``params.json`` into an existing folder (not atomic on its own)."""
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        meta_key = torchft_to_meta_key(key)
        if meta_key is None or is_adapter_key(key):
            raise CheckpointError(f"state dict key {key} has no Meta-format name (merge adapters first; no biases)")
        tensor = to_plain_tensor(tensor).cpu()
        if key.endswith("self_attn.q_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, n_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, n_kv_heads)
        out[meta_key] = tensor
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        # Tied model: Meta's reference code has a separate output projection, so store the shared matrix.
        out["output.weight"] = out["tok_embeddings.weight"]
    torch.save(out, folder / CONSOLIDATED_FILE)
    (folder / PARAMS_FILE).write_text(json.dumps(dict(params), indent=2) + "\n")


def save_meta_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    output_dir: str | os.PathLike,
    *,
    config: Any,
    params: Mapping[str, Any] | None = None,
    copy_files_from: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a torchft state dict as ``consolidated.00.pth`` + ``params.json`` (atomic folder write).

    Args:
        config: ``LlamaArgs`` or a Llama config dict; ``params.json`` is derived from it unless
            ``params`` (e.g. the input's own ``params.json``) is given.
        copy_files_from: input folder to copy ``tokenizer.model`` & co. from (output must not be inside it).
    """
    refuse_nested_output(output_dir, copy_files_from)
    if params is None:
        hf = config if isinstance(config, Mapping) else config.to_hf_config()
        params = hf_config_to_meta_params(hf)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        write_meta_weights(state_dict, tmp, params)
        copy_support_files(copy_files_from, tmp)
    return Path(output_dir)
