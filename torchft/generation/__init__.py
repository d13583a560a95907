"""Using a trained model: KV-cache decoding and sampling, loading for inference (with adapters), and
post-training weight quantization through torchao."""
from torchft.generation._generate import GenerationOutput, generate, generate_with_stats
from torchft.generation._loading import adapter_build_kwargs, load_model
from torchft.generation._prompt import encode_prompt
from torchft.generation._quantize import SCHEMES, check_scheme, load_quantized, quantize_model, save_quantized, stored_bytes
from torchft.generation._sampling import sample_next_token

__all__ = [
    "SCHEMES", "GenerationOutput", "adapter_build_kwargs", "check_scheme", "encode_prompt", "generate",
    "generate_with_stats", "load_model", "load_quantized", "quantize_model", "sample_next_token", "save_quantized",
    "stored_bytes",
]
