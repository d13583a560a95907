"""Model-level adapter utilities: find, initialize, train, load (checked), merge, disable, measure."""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from torchft.modules.peft import _nf4
from torchft.modules.peft.dora import DoRALinear
from torchft.modules.peft.lora import LoRALinear
from torchft.modules.peft.merge import iter_state_dict


def get_lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA/DoRA layer of ``model`` by its module name (e.g. ``layers.0.self_attn.q_proj``)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (``lora_a.weight``, ``lora_b.weight``, DoRA ``magnitude``) by full name."""
    params = {}
    for module_name, module in get_lora_modules(model).items():
        for name in module.adapter_param_names():
            params[_join(module_name, name)] = module.get_parameter(name)
    return params


def set_trainable_params(model: nn.Module, adapter_params: Mapping[str, nn.Parameter]) -> None:
    """Make exactly the parameters named in ``adapter_params`` trainable; freeze everything else."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapter_params)


def get_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, detached (cheap: never dequantizes a base weight)."""
    return {name: param.detach() for name, param in get_adapter_params(model).items()}


def initialize_dora_magnitudes(model: nn.Module) -> None:
    """Call ``initialize_dora_magnitude()`` on every DoRA layer (after the base weights are loaded)."""
    for module in get_lora_modules(model).values():
        if isinstance(module, DoRALinear):
            module.initialize_dora_magnitude()


def initialize_adapters(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Give a model built on ``meta`` fresh adapters once its base weights are loaded.

    Adapter weights still on ``meta`` are allocated on ``device`` (default: the device of the layer's
    base weight) and initialized (Kaiming-uniform A, zero B); DoRA magnitudes are then set from the
    loaded base weights. Adapters that are already real (e.g. loaded from a checkpoint) are left alone.
    """
    for module in get_lora_modules(model).values():
        fresh = module.lora_a.weight.is_meta or module.lora_b.weight.is_meta
        target = torch.device(device) if device is not None else module.weight.device
        if fresh:
            module.lora_a.to_empty(device=target)
            module.lora_b.to_empty(device=target)
            module.reset_adapter_parameters()
        if isinstance(module, DoRALinear) and (fresh or module.magnitude.is_meta):
            if module.magnitude.is_meta:
                module.magnitude = nn.Parameter(
                    torch.empty_like(module.magnitude, device=target), requires_grad=module.magnitude.requires_grad
                )
            module.initialize_dora_magnitude()


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA/DoRA layer returns its base output (the model without adapters)."""
    modules = list(get_lora_modules(model).values())
    previous = [module.disabled for module in modules]
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module, was_disabled in zip(modules, previous):
            module.disabled = was_disabled


def get_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state dict with every adapter merged into its base weight and no adapter keys.

    LoRA: ``W + (alpha / rank) * B @ A``; DoRA: ``magnitude * (W + s B A) / ||W + s B A||``. NF4 base
    weights are dequantized. The result loads into a plain (non-LoRA) model of the same dimensions.
    To merge onto the original weights instead, or one module at a time, see ``iter_state_dict``.
    """
    return dict(iter_state_dict(model, merge_adapters=True, include_tied=True))


def state_dict_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of everything ``model.state_dict()`` would hold, without dequantizing anything."""
    shapes = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            shapes[_join(module_name, name)] = tuple(param.shape)
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                shapes[_join(module_name, name)] = tuple(buffer.shape)
    return shapes


def _list_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:8])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def validate_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, kind: str) -> None:
    """Check a state dict against a LoRA model before loading it.

    ``kind="base"``: the state dict may lack only adapter keys (a full state dict, adapters
    included, passes too). ``kind="adapter"``: it must hold exactly the adapter keys (the base keys
    are expected to be missing). Unknown keys, other missing keys and shape mismatches raise
    ``ValueError`` naming the keys.
    """
    if kind not in ("base", "adapter"):
        raise ValueError(f"kind ({kind!r}) must be 'base' or 'adapter'")
    expected = state_dict_keys(model)
    adapter_keys = set(get_adapter_params(model))
    base_keys = set(expected) - adapter_keys
    allowed_missing = adapter_keys if kind == "base" else base_keys
    allowed = set(expected) if kind == "base" else adapter_keys

    unexpected = [key for key in state_dict if key not in allowed]
    if unexpected:
        what = "keys the model does not have" if kind == "base" else "keys that are not adapter weights"
        raise ValueError(f"{kind} state dict has {what}: {_list_keys(unexpected)}")
    missing = [key for key in expected if key not in state_dict and key not in allowed_missing]
    if missing:
        raise ValueError(f"{kind} state dict is missing keys: {_list_keys(missing)}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{kind} state dict: {key} has shape {list(tensor.shape)}, the model expects {list(expected[key])}"
            )


def validate_missing_and_unexpected_for_lora(
    model: nn.Module, missing_keys: list[str], unexpected_keys: list[str], *, kind: str
) -> None:
    """Check the result of ``model.load_state_dict(sd, strict=False)`` after the fact.

    ``kind="base"``: only adapter keys may be missing; ``kind="adapter"``: only base keys may be
    missing. Any unexpected key, or another missing key, raises ``ValueError`` naming the keys.
    (``load_base_state_dict`` / ``load_adapter_state_dict`` check before loading instead.)
    """
    if kind not in ("base", "adapter"):
        raise ValueError(f"kind ({kind!r}) must be 'base' or 'adapter'")
    if unexpected_keys:
        raise ValueError(f"{kind} load: unexpected keys: {_list_keys(unexpected_keys)}")
    adapter_keys = set(get_adapter_params(model))
    allowed_missing = adapter_keys if kind == "base" else set(state_dict_keys(model)) - adapter_keys
    missing = [key for key in missing_keys if key not in allowed_missing]
    if missing:
        raise ValueError(f"{kind} load: missing keys: {_list_keys(missing)}")


def _lora_owner(key: str, lora_names: set[str]) -> str | None:
    """The LoRA layer a key belongs to (``layers.0.self_attn.q_proj`` for its ``lora_a.weight``), if any."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in lora_names:
            return prefix
    return None


def load_base_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    assign: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Load base weights into a LoRA model: only adapter keys may be missing (checked first).

    Use ``assign=True`` for a model built on ``meta``; NF4 layers quantize their weights on load.
    With ``device`` and/or ``dtype``, tensors are moved/cast (floating point only) one LoRA layer at a
    time just before they are loaded, so a memory-mapped CPU checkpoint is quantized on the GPU
    without ever holding it all there.
    """
    validate_lora_state_dict(model, state_dict, kind="base")
    if device is None and dtype is None:
        model.load_state_dict(state_dict, strict=False, assign=assign)
        return

    def prepare(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)

    # One load per tensor, except that a LoRA layer's tensors load together (a DoRA magnitude must
    # arrive with its weight, or the weight's load would reset it).
    lora_names = set(get_lora_modules(model))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        groups.setdefault(_lora_owner(key, lora_names) or key, {})[key] = tensor
    for group in groups.values():
        model.load_state_dict({key: prepare(tensor) for key, tensor in group.items()}, strict=False, assign=assign)


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load adapter weights (torchft names); exactly the adapter keys must be present (checked first).

    Adapter parameters still on ``meta`` take the loaded tensors as they are; others are copied into
    (keeping their device and dtype).
    """
    validate_lora_state_dict(model, state_dict, kind="adapter")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            param = getattr(module, param_name)
            if param.is_meta:
                setattr(module, param_name, nn.Parameter(tensor.detach().clone(), requires_grad=param.requires_grad))
            else:
                param.copy_(tensor)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers as stored (NF4 counted packed + scales,
    an int8 base weight with its scales).

    Works on a model built on ``meta``, so the memory of a (Q)LoRA model is known before loading it.
    Tied weights are counted once.
    """
    seen = set()
    total = 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + [
            (name, buffer)
            for name, buffer in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set or name == "weight_scale"  # int8 base scales
        ]
        for _, tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += _nf4.tensor_bytes(tensor)
    return total
