"""Load a model for inference (generation, evaluation, quantization) from an HF checkpoint folder,
optionally with a PEFT adapter folder on top, optionally merged into plain weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def adapter_build_kwargs(adapter_dir: str | Path) -> dict[str, Any]:
    """Builder arguments (``lora_attn_modules``, ``lora_rank``...) that recreate the adapter described by
    ``<adapter_dir>/adapter_config.json`` (the HF PEFT format). Dropout is off: this is for inference."""
    from torchft.checkpoint.peft import peft_config_to_lora_kwargs, read_peft_adapter_config

    kwargs = peft_config_to_lora_kwargs(read_peft_adapter_config(adapter_dir))
    kwargs["lora_dropout"] = 0.0
    return kwargs


def load_model(
    checkpoint_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    merge_adapter: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Build the model ``<checkpoint_dir>/config.json`` describes and load its weights (eval mode).

    Args:
        checkpoint_dir: an HF folder (``config.json`` + safetensors), e.g. a ``step_<N>/`` output, or a
            folder written by the quantize recipe (loaded with :func:`load_quantized`).
        adapter_dir: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``);
            the model is then built with matching LoRA/DoRA layers and the adapter loaded into them.
        merge_adapter: fold the adapter into the base weights and return a plain model.
        dtype: weights dtype (adapters included).
    """
    from torchft.checkpoint import load_hf_checkpoint
    from torchft.generation._quantize import is_quantized_dir, load_quantized
    from torchft.models import from_hf_config

    if is_quantized_dir(checkpoint_dir):  # written by the quantize recipe
        if adapter_dir is not None:
            raise ValueError(f"{checkpoint_dir} is quantized; merge the adapter before quantizing (adapter_dir=null)")
        return load_quantized(checkpoint_dir, device=device)

    lora_kwargs = adapter_build_kwargs(adapter_dir) if adapter_dir is not None else {}
    with torch.device("meta"):
        model = from_hf_config(Path(checkpoint_dir), **lora_kwargs)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in load_hf_checkpoint(checkpoint_dir).items()}
    model.load_state_dict(state_dict, strict=not lora_kwargs, assign=True)
    if lora_kwargs:
        # Adapter parameters are still on meta: give them storage, then fill them from the adapter folder.
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    setattr(module, name, nn.Parameter(torch.zeros(param.shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        from torchft.checkpoint import load_peft_adapter

        load_peft_adapter(model, adapter_dir)
        if merge_adapter:
            from torchft.modules.peft import get_merged_state_dict

            merged = get_merged_state_dict(model)
            with torch.device("meta"):
                model = from_hf_config(Path(checkpoint_dir))
            model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in merged.items()}, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
