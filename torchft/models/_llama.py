"""The Llama architecture: its dimensions (``LlamaArgs``), the generic builder and config.json I/O.

Every Llama release (2, 3, 3.1, 3.2) is this one architecture with different numbers; the presets in
``torchft.models.llama*`` only fill in those numbers.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from torchft.modules.attention import GroupedQueryAttention
from torchft.modules.feed_forward import FeedForward
from torchft.modules.peft.lora import LORA_ATTN_MODULES  # noqa: F401  (re-exported by torchft.models)
from torchft.modules.rms_norm import RMSNorm
from torchft.modules.rope import SUPPORTED_ROPE_TYPES, RotaryEmbedding
from torchft.modules.transformer import TransformerDecoder, TransformerDecoderLayer


@dataclasses.dataclass
class LlamaArgs:
    """Dimensions of a Llama-architecture model; ``model.args`` on every built model.

    ``head_dim`` defaults to ``embed_dim // num_heads``; ``rope_scaling`` is config.json's dict
    (``{"rope_type": "llama3", "factor": 8.0, ...}``) or None.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    head_dim: Optional[int] = None
    rope_base: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim",
                     "intermediate_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}), "
                    "or head_dim must be given"
                )
            self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be a positive even number (rotary embeddings)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)

    # ---- config.json --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: Union[str, Path, dict[str, Any]]) -> "LlamaArgs":
        """Reads a transformers ``config.json`` (a dict, the file, or the folder holding it).

        Both shapes found in the wild are read: ``rope_theta`` + ``rope_scaling`` (published model
        repos) and ``rope_parameters`` (transformers 5). A config of another architecture is refused.
        """
        config, where = _read_config(path_or_dict)
        _check_llama_architecture(config, where)
        rope_base, rope_scaling = _rope_from_config(config, where)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if config.get(k) is None]
        if missing:
            raise ValueError(f"{where}: missing required field(s) {', '.join(missing)}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; Llama models use 'silu'")
        try:
            return cls(
                vocab_size=config["vocab_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                embed_dim=config["hidden_size"],
                intermediate_dim=config["intermediate_size"],
                max_seq_len=config.get("max_position_embeddings", 2048),
                head_dim=config.get("head_dim"),
                rope_base=float(rope_base),
                rope_scaling=rope_scaling,
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attn_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf_config(self, dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
        """A transformers ``LlamaForCausalLM`` config.json dict (published-repo shape: rope_theta +
        rope_scaling, which every transformers version reads)."""
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attn_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if dtype is not None:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        return config

    def num_params(self) -> int:
        """Parameter count of the plain (no adapter) model, tied output counted once."""
        d, hd, L = self.embed_dim, self.head_dim, self.num_layers
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        if self.attn_bias:
            attn += self.num_heads * hd + 2 * self.num_kv_heads * hd + d
        mlp = 3 * d * self.intermediate_dim + (2 * self.intermediate_dim + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        output = 0 if self.tie_word_embeddings else self.vocab_size * d
        return embed + L * per_layer + d + output


def _read_config(path_or_dict: Union[str, Path, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "config"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a model folder with a config.json")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def _check_llama_architecture(config: dict[str, Any], where: str) -> None:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "llama" and all(a == "LlamaForCausalLM" for a in architectures):
        return
    if model_type is None and not architectures:
        raise ValueError(f"{where}: no model_type or architectures field; cannot tell whether this is a Llama model")
    described = f"model_type {model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
    raise ValueError(f"{where}: describes {described}; torchft builds Llama-architecture models "
                     "(model_type 'llama', LlamaForCausalLM) only")


def _rope_from_config(config: dict[str, Any], where: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling or None) from either config shape."""
    params = config.get("rope_parameters")
    if params:  # transformers 5: theta and scaling in one dict
        params = dict(params)
        theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling")
    try:
        return theta, _normalise_rope_scaling(scaling) if scaling else None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _normalise_rope_scaling(scaling: dict[str, Any]) -> Optional[dict[str, Any]]:
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    required = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",)}[rope_type]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
    return {"rope_type": rope_type, **{k: scaling[k] for k in required}}


# ---- the builder ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _AdapterSpec:
    """Where adapters go and how they are made (None of it applies to a plain model)."""

    attn_modules: tuple[str, ...] = ()
    mlp: bool = False
    output: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_dora: bool = False
    quantize_base: Union[bool, str] = False  # False, True/"nf4" or "int8"

    def linear(self, in_dim: int, out_dim: int, bias: bool, adapted: bool, frozen_base: bool = True) -> nn.Module:
        """A plain ``nn.Linear``, a LoRA/DoRA linear, or a frozen linear stored as NF4 or int8."""
        if adapted:
            from torchft.modules.peft import DoRALinear, LoRALinear

            cls = DoRALinear if self.use_dora else LoRALinear
            return cls(in_dim, out_dim, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                       use_bias=bias, quantize_base=self.quantize_base if frozen_base else False)
        if self.quantize_base and frozen_base:
            from torchft.modules.peft import FrozenLinear

            return FrozenLinear(in_dim, out_dim, use_bias=bias, quantize_base=self.quantize_base)
        return nn.Linear(in_dim, out_dim, bias=bias)


def llama(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: Optional[int] = None,
    rope_base: float = 10000.0,
    rope_scaling: Optional[dict[str, Any]] = None,
    norm_eps: float = 1e-5,
    tie_word_embeddings: bool = False,
    attn_bias: bool = False,
    mlp_bias: bool = False,
    *,
    lora_attn_modules: Sequence[str] = (),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: Union[bool, str] = False,
) -> TransformerDecoder:
    """Builds a Llama-architecture decoder; with any ``lora_*`` target, the adapted linears are
    ``LoRALinear`` (``DoRALinear`` when ``use_dora``) and, with ``quantize_base``, every frozen
    linear of the decoder layers stores its weight in NF4 (``True`` or ``"nf4"``: QLoRA) or as
    per-channel int8 (``"int8"``). Embeddings, norms and the output projection stay in the default dtype.

    Builds on the current default device: wrap in ``with torch.device("meta"):`` to build any size
    without allocating, then ``load_state_dict(sd, assign=True)``.
    """
    args = LlamaArgs(vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim, max_seq_len,
                     head_dim, rope_base, rope_scaling, norm_eps, tie_word_embeddings, attn_bias, mlp_bias)
    lora_attn_modules = tuple(lora_attn_modules or ())
    if lora_attn_modules or apply_lora_to_mlp or apply_lora_to_output or quantize_base:
        from torchft.modules.peft import validate_lora_targets
        from torchft.modules.peft.frozen_linear import base_format

        validate_lora_targets(lora_attn_modules)
        quantize_base = base_format(quantize_base) or False  # one clear error before any layer is built
    if apply_lora_to_output and tie_word_embeddings:
        raise ValueError("apply_lora_to_output is not supported with tie_word_embeddings: the output projection "
                         "is the embedding matrix; set apply_lora_to_output=False")
    spec = _AdapterSpec(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
                        lora_dropout, use_dora, quantize_base)
    return build_from_args(args, spec)


def build_from_args(args: LlamaArgs, spec: Optional[_AdapterSpec] = None) -> TransformerDecoder:
    """Builds the model ``args`` describes, with adapters as ``spec`` says (none by default)."""
    spec = spec or _AdapterSpec()
    d, hd = args.embed_dim, args.head_dim
    layers = nn.ModuleList()
    for _ in range(args.num_layers):
        attn_linear = lambda name, i, o: spec.linear(i, o, args.attn_bias, adapted=name in spec.attn_modules)
        self_attn = GroupedQueryAttention(
            args.num_heads, args.num_kv_heads, hd,
            q_proj=attn_linear("q_proj", d, args.num_heads * hd),
            k_proj=attn_linear("k_proj", d, args.num_kv_heads * hd),
            v_proj=attn_linear("v_proj", d, args.num_kv_heads * hd),
            o_proj=attn_linear("o_proj", args.num_heads * hd, d),
        )
        mlp = FeedForward(
            gate_proj=spec.linear(d, args.intermediate_dim, args.mlp_bias, adapted=spec.mlp),
            up_proj=spec.linear(d, args.intermediate_dim, args.mlp_bias, adapted=spec.mlp),
            down_proj=spec.linear(args.intermediate_dim, d, args.mlp_bias, adapted=spec.mlp),
        )
        layers.append(TransformerDecoderLayer(self_attn, mlp, RMSNorm(d, args.norm_eps), RMSNorm(d, args.norm_eps)))

    lm_head = None
    if not args.tie_word_embeddings:
        # The output projection is never quantized: it stays in the default dtype (QLoRA included).
        lm_head = spec.linear(d, args.vocab_size, False, adapted=spec.output, frozen_base=False)
    model = TransformerDecoder(
        embed_tokens=nn.Embedding(args.vocab_size, d),
        layers=layers,
        norm=RMSNorm(d, args.norm_eps),
        rope=RotaryEmbedding(hd, args.rope_base, args.rope_scaling),
        lm_head=lm_head,
        max_seq_len=args.max_seq_len,
    )
    model.args = args
    model.adapter_spec = spec
    return model


def from_hf_config(path_or_dict: Union[str, Path, dict[str, Any]], **lora_kwargs: Any) -> TransformerDecoder:
    """Builds any Llama-architecture model from a transformers config.json (dict, file or folder).

    ``lora_kwargs`` are the builder's adapter options (``lora_attn_modules``, ``apply_lora_to_mlp``,
    ``apply_lora_to_output``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``use_dora``,
    ``quantize_base``).
    """
    args = LlamaArgs.from_hf_config(path_or_dict)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    return llama(**fields, **lora_kwargs)
