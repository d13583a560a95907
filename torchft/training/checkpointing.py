"""Weights for a step folder, gathered to the CPU one layer at a time.

``model.state_dict()`` of a QLoRA model dequantizes every NF4 weight at once on the GPU (16 GB more
for an 8B model), and merging all adapters at once would too. Here each module's tensors are built,
merged and moved to the CPU before the next module's, so saving never needs more than one layer of
extra device memory.
"""
from pathlib import Path

import torch
from torch import nn


def cpu_state_dict(model: nn.Module, merge_adapters: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU; with ``merge_adapters`` every LoRA/DoRA layer's adapter is
    merged into its base ``weight`` and the adapter keys are left out (a plain model's state dict)."""
    from torchft.modules.peft import LoRALinear
    from torchft.modules.peft.frozen_linear import FrozenLinear

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            skip = set(module.adapter_param_names()) if merge_adapters and isinstance(module, LoRALinear) else set()
            for name, tensor in module.named_parameters(recurse=False):
                if id(tensor) in seen:  # a tied weight appears once, under its first name
                    continue
                seen.add(id(tensor))
                if name == "weight" and isinstance(module, FrozenLinear):
                    use_merged = merge_adapters and isinstance(module, LoRALinear)
                    tensor = module.merged_weight() if use_merged else module.dequantized_weight()
                out[prefix + name] = tensor.detach().to("cpu", copy=True)
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    out[prefix + name] = buffer.detach().to("cpu", copy=True)
            for name in skip:  # adapter params live in child modules (lora_a / lora_b) or on the module (DoRA)
                out.pop(prefix + name, None)
    if merge_adapters:
        adapter_suffixes = (".lora_a.weight", ".lora_b.weight", ".magnitude")
        out = {k: v for k, v in out.items() if not k.endswith(adapter_suffixes)}
    return out


def adapter_state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter weights (torchft names) on the CPU."""
    from torchft.modules.peft import get_adapter_params

    return {name: p.detach().to("cpu", copy=True) for name, p in get_adapter_params(model).items()}


def describe_save(path: Path) -> str:
    files = sorted(p.name for p in Path(path).iterdir())
    return f"saved {path} ({', '.join(files)})"

