"""Llama model family: ``LlamaArgs``, the generic ``llama`` builder, ``from_hf_config`` and the
per-release presets in ``torchft.models.llama2``, ``llama3``, ``llama3_1`` and ``llama3_2``."""
from torchft.models._llama import LORA_ATTN_MODULES, LlamaArgs, build_from_args, from_hf_config, llama

__all__ = ["LORA_ATTN_MODULES", "LlamaArgs", "build_from_args", "from_hf_config", "llama"]
