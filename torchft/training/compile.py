"""``torch.compile`` applied per decoder layer: compile time stays that of one layer, and the
layers (identical code) share one compiled graph."""
from torch import nn


def compile_layers(model: nn.Module, layer_cls: type[nn.Module] | None = None) -> int:
    """Compile every ``layer_cls`` module (default ``TransformerDecoderLayer``) in place.

    Apply after activation checkpointing so the recompute is compiled too. Returns the count.
    """
    if layer_cls is None:
        from torchft.modules.transformer import TransformerDecoderLayer

        layer_cls = TransformerDecoderLayer
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    for layer in layers:
        layer.compile()
    return len(layers)
