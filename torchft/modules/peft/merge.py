"""Merging adapters into base weights: one formula, and a model's weights one module at a time.

``merge_adapter_weight`` takes plain tensors, so it serves a whole model, one layer of a sharded
model, or weights read back from files alike. ``iter_state_dict`` walks a model and yields its
weights with the adapters merged, building (and, with ``device``, moving) one module's tensors
before the next, so an export never needs a second copy of the whole model.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn

from torchft.modules.peft.frozen_linear import FrozenLinear
from torchft.modules.peft.lora import LoRALinear

ADAPTER_KEY_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".magnitude")


def merge_adapter_weight(
    base: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged weight [out, in] in ``base``'s dtype and on its device (computed in fp32).

    LoRA: ``W + scaling * B @ A``; DoRA (``magnitude`` [out] given):
    ``magnitude * (W + scaling * B @ A) / ||W + scaling * B @ A||`` with row norms (over ``in``).
    ``base`` [out, in] must be a plain tensor (dequantize NF4 first); ``lora_a`` [r, in], ``lora_b`` [out, r].
    """
    device = base.device
    adapted = base.float() + scaling * (lora_b.to(device).float() @ lora_a.to(device).float())  # [out, in]
    if magnitude is not None:
        adapted = adapted * (magnitude.to(device).float() / torch.linalg.norm(adapted, dim=1))[:, None]
    return adapted.to(base.dtype)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _from_base(base_weights: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    if key not in base_weights:
        raise KeyError(f"{key}: not in the base weights to merge onto (is it the checkpoint the model was built from?)")
    tensor = base_weights[key]
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"{key}: base weight has shape {list(tensor.shape)}, the model has {list(like.shape)}")
    return tensor


def iter_state_dict(
    model: nn.Module,
    *,
    merge_adapters: bool = False,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    include_tied: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of the model's state dict, one module at a time (NF4 weights dequantized).

    Args:
        model: any torchft model, with or without LoRA/DoRA layers.
        merge_adapters: merge every adapter into its layer's ``weight`` and leave the adapter keys
            out (what remains loads into a plain model).
        base_weights: the original weights (torchft keys, e.g. memory-mapped from the checkpoint the
            model was loaded from). Every frozen tensor is then taken from here instead of the model,
            and adapters are merged onto it: a QLoRA export then holds the original weights, not
            their NF4 approximation, and a layer without an adapter is the input tensor itself.
            Trainable tensors other than adapters always come from the model.
        device: move each tensor there (e.g. ``"cpu"``, copied) before the next module is built;
            None keeps the model's tensors where they are. Tensors from ``base_weights`` pass as is.

    A weight tied to another (``lm_head`` / ``embed_tokens``) appears once, under its first name,
    unless ``include_tied`` (then under each name, as ``model.state_dict()`` has it).
    """
    seen: set[int] = set()
    yielded: dict[int, torch.Tensor] = {}  # id(parameter) -> what was yielded for it, for tied names

    def from_model(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor if device is None else tensor.to(device, copy=True)

    with torch.no_grad():
        for module_name, module in model.named_modules():
            merge = merge_adapters and isinstance(module, LoRALinear)
            adapter_names = set(module.adapter_param_names()) if isinstance(module, LoRALinear) else set()
            for name, param in module.named_parameters(recurse=False):
                key = _join(module_name, name)
                if id(param) in seen:  # a tied weight, or an adapter already merged
                    if include_tied and id(param) in yielded:
                        yield key, yielded[id(param)]
                    continue
                seen.add(id(param))
                if merge and name in adapter_names:
                    continue  # DoRA's magnitude lives on the module itself
                original = None
                if base_weights is not None and not param.requires_grad:
                    original = _from_base(base_weights, key, param)
                if name == "weight" and isinstance(module, FrozenLinear) and merge:
                    base = original if original is not None else module.dequantized_weight()
                    tensor = module.merged_weight(base)
                    tensor = tensor if device is None else tensor.to(device)
                elif original is not None:
                    tensor = original
                elif name == "weight" and isinstance(module, FrozenLinear):
                    tensor = from_model(module.dequantized_weight())
                else:
                    tensor = from_model(param)
                if include_tied:
                    yielded[id(param)] = tensor
                yield key, tensor
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    key = _join(module_name, name)
                    if base_weights is not None and key in base_weights:
                        yield key, _from_base(base_weights, key, buffer)
                    else:
                        yield key, from_model(buffer)
            if merge:  # skip the adapter children (lora_a / lora_b) of this layer
                seen.update(id(p) for p in module.parameters())
