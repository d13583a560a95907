"""Parameter-efficient fine-tuning: LoRA, DoRA and QLoRA (NF4 or int8 base weights via torchao).

Layers: ``LoRALinear``, ``DoRALinear`` (both take ``quantize_base=True``/``"nf4"`` for QLoRA,
``"int8"`` for an 8-bit base), ``FrozenLinear`` (a frozen linear, quantized or not) and
``FrozenNF4Linear`` (a frozen NF4 linear without adapter). Model-level helpers find the adapter
parameters, make only them trainable, load base/adapter weights with key checks, merge adapters
into plain weights, disable adapters temporarily and report weight bytes (NF4-aware).
torchao is imported only when NF4 is used.
"""
from torchft.modules.peft.dora import DoRALinear
from torchft.modules.peft.frozen_linear import FrozenLinear, FrozenNF4Linear
from torchft.modules.peft.lora import LORA_ATTN_MODULES, LoRALinear, validate_lora_hparams, validate_lora_targets
from torchft.modules.peft.merge import iter_state_dict, merge_adapter_weight
from torchft.modules.peft.utils import (
    disable_adapter,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_modules,
    get_merged_state_dict,
    initialize_adapters,
    initialize_dora_magnitudes,
    load_adapter_state_dict,
    load_base_state_dict,
    set_trainable_params,
    state_dict_keys,
    validate_lora_state_dict,
    validate_missing_and_unexpected_for_lora,
    weight_bytes,
)

__all__ = [
    "LORA_ATTN_MODULES",
    "DoRALinear",
    "FrozenLinear",
    "FrozenNF4Linear",
    "LoRALinear",
    "disable_adapter",
    "get_adapter_params",
    "get_adapter_state_dict",
    "get_lora_modules",
    "get_merged_state_dict",
    "initialize_adapters",
    "initialize_dora_magnitudes",
    "iter_state_dict",
    "load_adapter_state_dict",
    "load_base_state_dict",
    "merge_adapter_weight",
    "set_trainable_params",
    "state_dict_keys",
    "validate_lora_hparams",
    "validate_lora_targets",
    "validate_missing_and_unexpected_for_lora",
    "weight_bytes",
]
