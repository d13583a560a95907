"""Llama 3 presets (meta-llama/Meta-Llama-3-{8B,70B} config.json) and its tiktoken tokenizer."""
from torchft.models._presets import preset_builders

LLAMA3_VOCAB = dict(vocab_size=128256, rope_base=500000.0, norm_eps=1e-5)

llama3_8b, lora_llama3_8b, qlora_llama3_8b = preset_builders(
    "llama3_8b", dict(LLAMA3_VOCAB, max_seq_len=8192, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                      intermediate_dim=14336),
    "Llama 3 8B (8.03B parameters)", __name__)
llama3_70b, lora_llama3_70b, qlora_llama3_70b = preset_builders(
    "llama3_70b", dict(LLAMA3_VOCAB, max_seq_len=8192, num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192,
                       intermediate_dim=28672),
    "Llama 3 70B (70.6B parameters)", __name__)


def llama3_tokenizer(path, max_seq_len=None, **kwargs):
    """The Llama 3 tiktoken tokenizer from Meta's ``tokenizer.model`` (see ``torchft.data.tokenizers``)."""
    from torchft.data.tokenizers import llama3_tokenizer as build

    return build(path, max_seq_len=max_seq_len, **kwargs)
