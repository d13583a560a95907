"""Llama 3.2 text presets (meta-llama/Llama-3.2-{1B,3B} config.json): tied embeddings, RoPE scaled by 32."""
from torchft.models._presets import preset_builders
from torchft.models.llama3 import LLAMA3_VOCAB, llama3_tokenizer  # noqa: F401  (same tokenizer)

ROPE_SCALING_3_2 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
_COMMON = dict(LLAMA3_VOCAB, max_seq_len=131072, rope_scaling=ROPE_SCALING_3_2, tie_word_embeddings=True)

llama3_2_1b, lora_llama3_2_1b, qlora_llama3_2_1b = preset_builders(
    "llama3_2_1b", dict(_COMMON, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192),
    "Llama 3.2 1B (1.24B parameters, tied embeddings)", __name__)
llama3_2_3b, lora_llama3_2_3b, qlora_llama3_2_3b = preset_builders(
    "llama3_2_3b", dict(_COMMON, num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072, intermediate_dim=8192),
    "Llama 3.2 3B (3.21B parameters, tied embeddings)", __name__)
