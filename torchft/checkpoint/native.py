"""torchft's own single-file format: one safetensors file with torchft keys and the model's config.

The config (``LlamaArgs.to_hf_config()``) is stored as JSON in the safetensors header metadata, so
the file alone rebuilds the model: ``args, sd = load_native_checkpoint(path)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torchft.checkpoint._io import (CheckpointError, atomic_file, not_safetensors_error, to_plain_tensor,
                                   unshare_tensors)
from torchft.checkpoint.validate import check_state_dict, is_adapter_key

FORMAT_KEY = "torchft_format"
FORMAT_VERSION = "1"
CONFIG_KEY = "torchft_config"


def save_native_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, config: Any) -> Path:
    """Write ``state_dict`` (torchft keys) and ``config`` (``LlamaArgs`` or config dict) to one file.

    The file is written under a temporary sibling name and renamed over ``path`` (atomic).
    Adapter weights are allowed (a LoRA model's full state dict round-trips as is).
    """
    path = Path(path)
    config = config if isinstance(config, Mapping) else config.to_hf_config()
    tensors = unshare_tensors({k: to_plain_tensor(v).cpu() for k, v in state_dict.items()})
    metadata = {"format": "pt", FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: json.dumps(dict(config), sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def load_native_checkpoint(path: str | os.PathLike, *, validate: bool = True):
    """Read a file written by ``save_native_checkpoint``: returns ``(LlamaArgs, state_dict)``.

    Tensors are memory-mapped. With ``validate`` the keys and shapes are checked against the
    stored config (adapter keys may be present or absent).
    """
    from torchft.models import LlamaArgs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as err:
        raise not_safetensors_error(path, err) from err
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION or CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path}: not a torchft checkpoint (no '{CONFIG_KEY}' in the file's metadata)")
    try:
        config = json.loads(metadata[CONFIG_KEY])
        args = LlamaArgs.from_hf_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable stored config ({err})") from err
    if validate:
        base = {k: v for k, v in shapes.items() if not is_adapter_key(k)}
        check_state_dict(base, args, where=path)
    with safe_open(path, framework="pt") as f:
        state_dict = {k: f.get_tensor(k) for k in shapes}
    return args, state_dict
