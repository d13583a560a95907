"""Llama 2 presets (meta-llama/Llama-2-{7b,13b,70b}-hf config.json) and its tokenizer."""
from torchft.models._presets import preset_builders

_COMMON = dict(vocab_size=32000, max_seq_len=4096, rope_base=10000.0, norm_eps=1e-5)

llama2_7b, lora_llama2_7b, qlora_llama2_7b = preset_builders(
    "llama2_7b", dict(_COMMON, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008),
    "Llama 2 7B (6.74B parameters)", __name__)
llama2_13b, lora_llama2_13b, qlora_llama2_13b = preset_builders(
    "llama2_13b", dict(_COMMON, num_layers=40, num_heads=40, num_kv_heads=40, embed_dim=5120, intermediate_dim=13824),
    "Llama 2 13B (13.0B parameters)", __name__)
llama2_70b, lora_llama2_70b, qlora_llama2_70b = preset_builders(
    "llama2_70b", dict(_COMMON, num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, intermediate_dim=28672),
    "Llama 2 70B (69.0B parameters, grouped-query attention)", __name__)


def llama2_tokenizer(path, max_seq_len=None, **kwargs):
    """The Llama 2 sentencepiece tokenizer from ``tokenizer.model`` (see ``torchft.data.tokenizers``)."""
    from torchft.data.tokenizers import llama2_tokenizer as build

    return build(path, max_seq_len=max_seq_len, **kwargs)
