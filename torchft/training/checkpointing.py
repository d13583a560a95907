"""Weights for a step folder, gathered to the CPU one layer at a time.

``model.state_dict()`` of a QLoRA model dequantizes every NF4 weight at once on the GPU (16 GB more
for an 8B model), and merging all adapters at once would too. Here each module's tensors are built,
merged and moved to the CPU before the next module's (``torchft.modules.peft.iter_state_dict``), so
saving never needs more than one layer of extra device memory.
"""
import torch
from torch import nn


def cpu_state_dict(model: nn.Module, merge_adapters: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU; with ``merge_adapters`` every LoRA/DoRA layer's adapter is
    merged into its base ``weight`` and the adapter keys are left out (a plain model's state dict)."""
    from torchft.modules.peft import iter_state_dict

    return dict(iter_state_dict(model, merge_adapters=merge_adapters, device="cpu"))


def adapter_state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter weights (torchft names) on the CPU."""
    from torchft.modules.peft import get_adapter_params

    return {name: p.detach().to("cpu", copy=True) for name, p in get_adapter_params(model).items()}
