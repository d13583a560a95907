"""LoRA/DoRA adapters in the Hugging Face PEFT format, both ways.

A folder holds ``adapter_model.safetensors`` and ``adapter_config.json``, which
``peft.PeftModel.from_pretrained(LlamaForCausalLM..., folder)`` loads. Module names are the same
on both sides (torchft uses transformers' Llama names), so only the key spelling changes:

    torchft                                    HF PEFT
    layers.0.self_attn.q_proj.lora_a.weight    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    layers.0.self_attn.q_proj.lora_b.weight    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight
    layers.0.self_attn.q_proj.magnitude        base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector
    lm_head.lora_a.weight                      base_model.model.lm_head.lora_A.weight
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from torchft.checkpoint._io import CheckpointError, atomic_file

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

_PEFT_PREFIX = "base_model.model."
# torchft parameter name (relative to the LoRA layer) -> PEFT's
_TO_PEFT_SUFFIX = {"lora_a.weight": "lora_A.weight", "lora_b.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_FROM_PEFT_SUFFIX = {v: k for k, v in _TO_PEFT_SUFFIX.items()}
# PEFT stores the base weight of a targeted embedding/output layer next to its adapter.
_PEFT_BASE_SUFFIXES = {"base_layer.weight": "weight", "base_layer.bias": "bias"}
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def _hf_module_name(name: str) -> str:
    """torchft module name -> transformers LlamaForCausalLM module name."""
    return name if name.split(".")[0] == "lm_head" else f"model.{name}"


def _torchft_module_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def to_peft_key(key: str) -> str:
    """``layers.0.self_attn.q_proj.lora_a.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    for ours, theirs in _TO_PEFT_SUFFIX.items():
        if key.endswith("." + ours):
            return _PEFT_PREFIX + _hf_module_name(key[: -len(ours) - 1]) + "." + theirs
    raise ValueError(f"{key} is not an adapter weight (expected a name ending in {', '.join(_TO_PEFT_SUFFIX)})")


def from_peft_key(key: str) -> tuple[str, bool] | None:
    """PEFT key -> (torchft key, is_base_weight), or None when it is no key PEFT LoRA writes for Llama."""
    if not key.startswith(_PEFT_PREFIX):
        return None
    rest = key[len(_PEFT_PREFIX):]
    for suffixes, is_base in ((_FROM_PEFT_SUFFIX, False), (_PEFT_BASE_SUFFIXES, True)):
        for theirs, ours in suffixes.items():
            if rest.endswith("." + theirs):
                return _torchft_module_name(rest[: -len(theirs) - 1]) + "." + ours, is_base
    return None


# ---- what the model's adapters are -----------------------------------------------------------------
def _adapter_settings(model: nn.Module) -> dict[str, Any]:
    """rank / alpha / dropout / use_dora shared by every LoRA layer, and the adapted module names."""
    from torchft.modules.peft import DoRALinear, get_lora_modules

    modules = get_lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA/DoRA layers: there is no adapter to save or load")
    settings = {
        "r": {m.rank for m in modules.values()},
        "lora_alpha": {m.alpha for m in modules.values()},
        "lora_dropout": {m.dropout_p for m in modules.values()},
        "use_dora": {isinstance(m, DoRALinear) for m in modules.values()},
    }
    for field, values in settings.items():
        if len(values) > 1:
            raise ValueError(f"the model's LoRA layers disagree on {field} ({sorted(values)}); a PEFT adapter has one")
    result = {field: values.pop() for field, values in settings.items()}
    result["modules"] = sorted(modules)
    return result


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT ``target_modules``: leaf names (``q_proj``) when every module of that name is adapted
    (the builders' layout), full module paths otherwise."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    adapted_set = set(adapted)
    all_with_leaf = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves]
    if all(name in adapted_set for name in all_with_leaf):
        return leaves
    return [_hf_module_name(name) for name in adapted]


# ---- save --------------------------------------------------------------------------------------------
def save_peft_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    *,
    adapter_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` (HF PEFT).

    Each file is written atomically (temporary file, then rename), so the folder may already hold
    other outputs (e.g. the merged model). ``adapter_state_dict`` (torchft names) replaces the
    model's own adapter tensors, e.g. full tensors gathered from a sharded model on rank 0; it must
    hold exactly the model's adapter keys. Returns the folder.
    """
    from safetensors.torch import save_file

    from torchft.modules.peft import get_adapter_state_dict, validate_lora_state_dict

    settings = _adapter_settings(model)
    if adapter_state_dict is None:
        adapter_state_dict = get_adapter_state_dict(model)
    else:
        validate_lora_state_dict(model, adapter_state_dict, kind="adapter")
    tensors = {to_peft_key(k): v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings["r"],
        "lora_alpha": settings["lora_alpha"],
        "lora_dropout": settings["lora_dropout"],
        "target_modules": _target_modules(model, settings["modules"]),
        "use_dora": settings["use_dora"],
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(adapter_dir / ADAPTER_WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_file(adapter_dir / ADAPTER_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return adapter_dir


# ---- load --------------------------------------------------------------------------------------------
# A fine-tuning run's step folder keeps its adapter in this sub-folder (beside the merged model).
ADAPTER_DIR = "adapter"


def resolve_adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    """The folder holding ``adapter_config.json``: ``adapter_dir`` itself, or its ``adapter/`` sub-folder
    when ``adapter_dir`` is a run's ``step_<N>/`` folder (which holds the merged model beside it)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG_NAME).is_file() and (adapter_dir / ADAPTER_DIR / ADAPTER_CONFIG_NAME).is_file():
        return adapter_dir / ADAPTER_DIR
    return adapter_dir


def read_peft_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``adapter_dir`` (or of its ``adapter/`` sub-folder, see
    :func:`resolve_adapter_dir`); only LoRA adapters with options torchft implements pass."""
    path = resolve_adapter_dir(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a PEFT adapter folder "
                                f"(or a step_<N> folder with {ADAPTER_DIR}/{ADAPTER_CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; torchft loads 'LORA' adapters")
    unsupported = {
        "use_rslora": (config.get("use_rslora", False), False),
        "bias": (config.get("bias", "none"), "none"),
        "fan_in_fan_out": (config.get("fan_in_fan_out", False), False),
        "modules_to_save": (config.get("modules_to_save") or None, None),
        "rank_pattern": (config.get("rank_pattern") or {}, {}),
        "alpha_pattern": (config.get("alpha_pattern") or {}, {}),
        "layers_to_transform": (config.get("layers_to_transform"), None),
    }
    for option, (value, supported) in unsupported.items():
        if value != supported:
            raise CheckpointError(f"{path}: {option}={value!r} is not supported (torchft needs {option}={supported!r})")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise CheckpointError(f"{path}: missing required field {field}")
    return config


def peft_config_to_lora_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Builder arguments (``lora_attn_modules``, ``apply_lora_to_mlp``, ...) that build a model this
    adapter fits, from a parsed ``adapter_config.json`` (see ``read_peft_adapter_config``)."""
    from torchft.modules.peft import LORA_ATTN_MODULES

    targets = config["target_modules"]
    if isinstance(targets, str):
        raise CheckpointError(f"target_modules given as a pattern ({targets!r}); torchft needs a list of module names")
    leaves = {name.rsplit(".", 1)[-1] for name in targets}
    known = set(LORA_ATTN_MODULES) | set(_MLP_MODULES) | {"lm_head"}
    if leaves - known:
        raise CheckpointError(
            f"target_modules {sorted(leaves - known)} are not Llama linear layers; valid names: {' '.join(sorted(known))}"
        )
    mlp = leaves & set(_MLP_MODULES)
    if mlp and mlp != set(_MLP_MODULES):
        raise CheckpointError(f"target_modules has {sorted(mlp)}: torchft puts LoRA on all of {' '.join(_MLP_MODULES)} or none")
    return {
        "lora_attn_modules": [name for name in LORA_ATTN_MODULES if name in leaves],
        "apply_lora_to_mlp": bool(mlp),
        "apply_lora_to_output": "lm_head" in leaves,
        "lora_rank": config["r"],
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": config.get("lora_dropout", 0.0),
        "use_dora": bool(config.get("use_dora", False)),
    }


def load_peft_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """Load an HF PEFT LoRA/DoRA adapter folder (or a run's ``step_<N>/`` folder, whose ``adapter/`` it
    reads) into a torchft model built with matching LoRA options.

    Checked first, each with one clear error: the config is a LoRA adapter for the expected base model
    (when both names are known), its rank / alpha / DoRA flag / targets match the model's, and the weight
    file holds exactly the model's adapter weights with the model's shapes. Returns the parsed config.
    """
    from safetensors.torch import load_file

    from torchft.modules.peft import load_adapter_state_dict, state_dict_keys, validate_lora_state_dict

    adapter_dir = resolve_adapter_dir(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    config = read_peft_adapter_config(adapter_dir)
    adapter_base = config.get("base_model_name_or_path")
    if base_model_name_or_path and adapter_base and adapter_base != base_model_name_or_path:
        raise CheckpointError(
            f"{config_path}: adapter is for base model {adapter_base!r}, not {base_model_name_or_path!r}"
        )

    settings = _adapter_settings(model)
    checks = {"r": "lora_rank", "lora_alpha": "lora_alpha", "use_dora": "use_dora"}
    for field, option in checks.items():
        value = config.get(field, False) if field == "use_dora" else config[field]
        if value != settings[field]:
            raise CheckpointError(f"{config_path}: {field}={value!r} does not match the model's {option} ({settings[field]!r})")
    wanted = peft_config_to_lora_kwargs(config)
    model_targets = sorted({name.rsplit(".", 1)[-1] for name in settings["modules"]})
    adapter_targets = sorted({name.rsplit(".", 1)[-1] for name in config["target_modules"]})
    if adapter_targets != model_targets:
        raise CheckpointError(
            f"{config_path}: target_modules {adapter_targets} do not match the model's LoRA layers {model_targets} "
            f"(build the model with {', '.join(f'{k}={v!r}' for k, v in wanted.items() if k != 'lora_dropout')})"
        )

    weights_path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: no such file; expected the adapter weights next to {ADAPTER_CONFIG_NAME}")
    adapter_state, base_state, unknown = {}, {}, []
    for key, tensor in load_file(str(weights_path)).items():
        mapped = from_peft_key(key)
        if mapped is None:
            unknown.append(key)
        elif mapped[1]:
            base_state[mapped[0]] = tensor
        else:
            adapter_state[mapped[0]] = tensor
    if unknown:
        raise CheckpointError(f"{weights_path}: keys that are not LoRA weights of a Llama model: {', '.join(sorted(unknown)[:8])}")
    try:
        validate_lora_state_dict(model, adapter_state, kind="adapter")
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from None
    expected_shapes = state_dict_keys(model)
    for key, tensor in base_state.items():
        if expected_shapes.get(key) != tuple(tensor.shape):
            raise CheckpointError(f"{weights_path}: base weight {key} {list(tensor.shape)} does not fit the model")

    load_adapter_state_dict(model, adapter_state)
    if base_state:  # PEFT saves the base of a targeted output/embedding layer; it loads it too
        model.load_state_dict(base_state, strict=False)
    return config
