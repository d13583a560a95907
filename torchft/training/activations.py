"""Activation memory: checkpointing (recompute in backward) and offloading (keep on the CPU).

Both are applied to an already-built model from the outside: the models never import training code.
"""
import contextlib

import torch
from torch import nn


def apply_activation_checkpointing(model: nn.Module, layer_cls: type[nn.Module] | None = None) -> int:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Every module of type ``layer_cls`` (default: ``TransformerDecoderLayer``) keeps only its input
    for backward. The module tree and the state-dict keys do not change (the composable
    ``checkpoint`` works through hooks, not a wrapper module), so saving, adapters and
    ``torch.compile`` see the same names. Returns the number of layers wrapped.
    """
    from torch.distributed._composable import checkpoint

    if layer_cls is None:
        from torchft.modules.transformer import TransformerDecoderLayer

        layer_cls = TransformerDecoderLayer
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    if not layers:
        raise ValueError(f"activation checkpointing found no {layer_cls.__name__} in the model")
    for layer in layers:
        checkpoint(layer)
        for module in layer.modules():
            if hasattr(module, "recompute_product"):  # the whole layer is recomputed: no partial recompute
                module.recompute_product = False
    return len(layers)


def activation_offloading(enabled: bool, device: torch.device | str):
    """A context manager that moves tensors saved for backward to pinned CPU memory.

    Use it around the forward pass (and the loss). It trades PCIe traffic for GPU memory: every
    activation is copied to the host in forward and back in backward. Only meaningful on CUDA;
    combined with activation checkpointing only the layer inputs travel.
    """
    if not enabled:
        return contextlib.nullcontext()
    if torch.device(device).type != "cuda":
        raise ValueError("enable_activation_offloading needs device=cuda (activations are offloaded from GPU to CPU)")
    return torch.autograd.graph.save_on_cpu(pin_memory=True)
