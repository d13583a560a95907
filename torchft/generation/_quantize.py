"""Post-training weight quantization through torchao ``quantize_``, and saving / loading the result.

Schemes (name -> torchao config):

=====================================  ============================================  =================
scheme                                 torchao config                                devices
=====================================  ============================================  =================
``int8_weight_only``                   ``Int8WeightOnlyConfig`` (per-row scales)     CPU, CUDA
``int8_dynamic_activation_int8_weight`` ``Int8DynamicActivationInt8WeightConfig``      CPU, CUDA
``int8_dynamic_activation_int4_weight`` ``Int8DynamicActivationIntxWeightConfig``      CPU, CUDA
                                       (int4 weights, per-group scales)
``int4_weight_only``                   ``Int4WeightOnlyConfig`` (tinygemm layout)    CUDA only
=====================================  ============================================  =================

A quantized model is saved as ``model_quantized.pt`` (``torch.save`` of the state dict, whose linear
weights are torchao tensor subclasses; safetensors cannot hold those), the input's ``config.json`` and
``quantization.json`` (scheme, group size, versions). :func:`load_quantized` rebuilds it on the meta
device and assigns the saved tensors, so the loaded model runs the same quantized kernels.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

QUANTIZED_WEIGHTS = "model_quantized.pt"
QUANTIZATION_CONFIG = "quantization.json"

# scheme -> devices it runs on (checked before torchao is asked, so the message can say what is needed).
SCHEMES: dict[str, tuple[str, ...]] = {
    "int8_weight_only": ("cpu", "cuda"),
    "int8_dynamic_activation_int8_weight": ("cpu", "cuda"),
    "int8_dynamic_activation_int4_weight": ("cpu", "cuda"),
    "int4_weight_only": ("cuda",),
}
_GROUPED = ("int8_dynamic_activation_int4_weight", "int4_weight_only")
# Files copied next to the quantized weights so the folder also serves generation.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "original/tokenizer.model")


def _torchao_config(scheme: str, group_size: int):
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    if scheme == "int8_dynamic_activation_int8_weight":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if scheme == "int8_dynamic_activation_int4_weight":
        return tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    # int4 weight-only: the tinygemm kernel (CUDA) wants bf16 activations and its own packed layout.
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    return tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)


def check_scheme(scheme: str, device: torch.device | str) -> None:
    """Raise ``ValueError`` for an unknown scheme or one this device cannot run (naming the device needed)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme '{scheme}'; choose one of {', '.join(SCHEMES)}")
    device_type = torch.device(device).type
    if device_type not in SCHEMES[scheme]:
        needed = " or ".join(d.upper() for d in SCHEMES[scheme])
        runs_here = [s for s, devices in SCHEMES.items() if device_type in devices]
        raise ValueError(
            f"quantization scheme '{scheme}' needs a {needed} device (torchao's kernels for it); this device is "
            f"{device_type}; schemes that run on {device_type}: {', '.join(runs_here)}"
        )


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 128, include_lm_head: bool = True) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place with ``scheme`` (see the table above).

    ``group_size`` applies to the int4 schemes and must divide the input size of every linear.
    Embeddings and norms stay as they are; ``include_lm_head=False`` leaves ``lm_head`` too (as QAT
    does by default). Returns the model.
    """
    from torchao.quantization import quantize_

    device = next(model.parameters()).device
    check_scheme(scheme, device)
    if scheme in _GROUPED:
        if group_size <= 0:
            raise ValueError(f"group_size ({group_size}) must be > 0")
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.in_features % group_size:
                raise ValueError(
                    f"group_size ({group_size}) must divide the input size of every linear; "
                    f"{name} has in_features {module.in_features}"
                )
    if scheme == "int4_weight_only" and next(model.parameters()).dtype != torch.bfloat16:
        raise ValueError("quantization scheme 'int4_weight_only' needs dtype=bf16 (the tinygemm kernel's input type)")
    keep = None if include_lm_head else getattr(model, "lm_head", None)
    quantize_(model, _torchao_config(scheme, group_size),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and module is not keep)
    return model


def save_quantized(model: nn.Module, output_dir: str | Path, *, scheme: str, group_size: int,
                   source_dir: str | Path | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the quantized weights, ``quantization.json`` and (from ``source_dir``) config and tokenizer files.

    Without ``source_dir`` (or when it has no ``config.json``), ``config.json`` comes from ``model.args``.

    The folder is written under a temporary name and renamed into place, so it is either whole or absent.
    """
    import torchao

    from torchft.checkpoint._io import commit_directory

    output_dir = Path(output_dir)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / QUANTIZED_WEIGHTS)
    info = {"scheme": scheme, "group_size": group_size if scheme in _GROUPED else None,
            "torchao_version": torchao.__version__, "torch_version": torch.__version__, **(extra or {})}
    (tmp / QUANTIZATION_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    if source_dir is not None:
        for name in _SIDE_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, tmp / name)
    if not (tmp / "config.json").is_file() and hasattr(model, "args"):
        # A model built in memory: describe it from its dimensions, as transformers would.
        (tmp / "config.json").write_text(json.dumps(model.args.to_hf_config(), indent=2) + "\n")
    commit_directory(tmp, output_dir)  # flushed, renamed over any previous folder, parent flushed
    return output_dir


def is_quantized_dir(folder: str | Path) -> bool:
    return (Path(folder) / QUANTIZATION_CONFIG).is_file()


def load_quantized(folder: str | Path, *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (eval mode, no gradients)."""
    from torchft.models import from_hf_config

    folder = Path(folder)
    if not is_quantized_dir(folder):
        raise FileNotFoundError(f"{folder}: no {QUANTIZATION_CONFIG}; not a folder written by the quantize recipe")
    info = json.loads((folder / QUANTIZATION_CONFIG).read_text())
    check_scheme(info["scheme"], device)
    with torch.device("meta"):
        model = from_hf_config(folder / "config.json")
    # Importing torchao's quantization package registers its tensor subclasses (Int8Tensor, ...) as safe
    # globals for weights_only loading; a fresh process has not imported it yet.
    import torchao.quantization  # noqa: F401

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # "cuda" with no index: torch.load then makes tensors on cuda:0 whose inner storages say "cuda",
        # and assigning them into the model fails (torch 2.11, int4 weights)
        device = torch.device("cuda", torch.cuda.current_device())
    state_dict = torch.load(folder / QUANTIZED_WEIGHTS, map_location=device, weights_only=True, mmap=True)
    model.load_state_dict(state_dict, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _tensor_bytes(t: torch.Tensor) -> int:
    # A torchao tensor subclass reports its logical dtype; count the storage of its inner tensors instead.
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and persistent buffers occupy as stored (quantized weights packed)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for b in model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total
