"""Llama 3.1 presets (meta-llama/Llama-3.1-{8B,70B,405B} config.json): Llama 3 with scaled RoPE, 128k context."""
from torchft.models._presets import preset_builders
from torchft.models.llama3 import LLAMA3_VOCAB, llama3_tokenizer  # noqa: F401  (same tokenizer)

ROPE_SCALING_3_1 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
_COMMON = dict(LLAMA3_VOCAB, max_seq_len=131072, rope_scaling=ROPE_SCALING_3_1)

llama3_1_8b, lora_llama3_1_8b, qlora_llama3_1_8b = preset_builders(
    "llama3_1_8b", dict(_COMMON, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336),
    "Llama 3.1 8B (8.03B parameters)", __name__)
llama3_1_70b, lora_llama3_1_70b, qlora_llama3_1_70b = preset_builders(
    "llama3_1_70b", dict(_COMMON, num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, intermediate_dim=28672),
    "Llama 3.1 70B (70.6B parameters)", __name__)
llama3_1_405b, lora_llama3_1_405b, qlora_llama3_1_405b = preset_builders(
    "llama3_1_405b", dict(_COMMON, num_layers=126, num_heads=128, num_kv_heads=8, embed_dim=16384,
                          intermediate_dim=53248),
    "Llama 3.1 405B (406B parameters)", __name__)
