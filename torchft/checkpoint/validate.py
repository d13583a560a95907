"""Check a state dict (or just its shapes) against a model's dimensions before anything is assigned."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch

from torchft.checkpoint._io import CheckpointError

# Parameters a base checkpoint never holds: adapters are created at build time and loaded separately.
_ADAPTER_MARKERS = (".lora_a.", ".lora_b.", ".magnitude")


def is_adapter_key(key: str) -> bool:
    """True for LoRA / DoRA parameters (``...lora_a.weight``, ``...lora_b.weight``, ``...magnitude``)."""
    return any(marker in key or key.endswith(marker) for marker in _ADAPTER_MARKERS)


def _args_to_model_on_meta(args: Any) -> torch.nn.Module:
    from torchft.models import build_from_args

    with torch.device("meta"):  # allocates nothing, any size
        return build_from_args(args)


def expected_shapes(expected: Any) -> dict[str, torch.Size]:
    """Shapes of every persistent tensor of the model ``expected`` describes.

    ``expected`` is a ``torchft.models.LlamaArgs`` (the model is built on the meta device, which
    allocates nothing), an ``nn.Module`` (typically built on meta) or a ``{key: shape}`` mapping.
    """
    if isinstance(expected, Mapping):
        return {k: torch.Size(v.shape if hasattr(v, "shape") else v) for k, v in expected.items()}
    if not isinstance(expected, torch.nn.Module):
        if not dataclasses.is_dataclass(expected) or not hasattr(expected, "to_hf_config"):
            raise TypeError(f"expected must be LlamaArgs, an nn.Module or a mapping of shapes, got {type(expected).__name__}")
        expected = _args_to_model_on_meta(expected)
    return {k: torch.Size(v.shape) for k, v in expected.state_dict().items()}


def _file_for(key: str, order: list[str], sources: Mapping[str, os.PathLike] | None, default: str) -> str:
    """The file to blame for ``key``: its own, else the file holding the nearest key before it in
    model order (where a checkpoint writer would have put it), else ``default``."""
    if not sources:
        return default
    if key in sources:
        return str(sources[key])
    if key in order:
        position = order.index(key)
        for neighbour in [*reversed(order[:position]), *order[position + 1:]]:
            if neighbour in sources:
                return str(sources[neighbour])
    return default


def check_state_dict(
    state_dict: Mapping[str, Any],
    expected: Any,
    *,
    sources: Mapping[str, os.PathLike] | None = None,
    where: str | os.PathLike = "state dict",
    key_names: Mapping[str, str] | None = None,
    allow_missing_adapters: bool = True,
) -> None:
    """Raise a ``CheckpointError`` naming the file and key when ``state_dict`` does not fit ``expected``.

    Args:
        state_dict: torchft keys to tensors, or to anything with a ``.shape`` / a shape tuple.
        expected: ``LlamaArgs``, a model (meta is fine) or a ``{key: shape}`` mapping; see ``expected_shapes``.
        sources: torchft key -> file it came from, so the message names the file.
        where: what to name when no file is known (the checkpoint folder).
        key_names: torchft key -> key as spelled in the file (``model.layers.0...``) for the message.
        allow_missing_adapters: LoRA/DoRA parameters of ``expected`` may be absent (loaded separately).

    Checks, in order: missing keys, unexpected keys, shapes. The first problem found is raised, with
    a count of the others of the same kind.
    """
    want = expected_shapes(expected)
    names = key_names or {}

    def spell(key: str) -> str:
        return names.get(key, key)

    missing = [k for k in want if k not in state_dict and not (allow_missing_adapters and is_adapter_key(k))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{_file_for(missing[0], list(want), sources, str(where))}: missing key {spell(missing[0])}{more}")
    unexpected = [k for k in state_dict if k not in want]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{_file_for(unexpected[0], list(want), sources, str(where))}: unexpected key {spell(unexpected[0])}{more}"
        )
    for key in want:  # model order: the first mismatch reported is the first in the network
        if key not in state_dict:
            continue
        value = state_dict[key]
        shape = torch.Size(value.shape if hasattr(value, "shape") else value)
        if shape != want[key]:
            raise CheckpointError(
                f"{_file_for(key, list(want), sources, str(where))}: {spell(key)} has shape {list(shape)} "
                f"but the model config expects {list(want[key])}"
            )


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                           where: str | os.PathLike = "state dict") -> None:
    """Check ``state_dict`` against ``model``, then ``model.load_state_dict(sd, assign=True)``.

    Adapter parameters of ``model`` may be absent (they keep their initial values). Nothing is
    assigned when a check fails. Works on a model built on the meta device: its parameters become
    the (memory-mapped) tensors of ``state_dict``.
    """
    check_state_dict(state_dict, model, where=where)
    model.load_state_dict(state_dict, strict=False, assign=True)
