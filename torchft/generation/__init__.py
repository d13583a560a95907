"""Text generation: sampling and KV-cache decoding for torchft models."""
from torchft.generation._generate import GenerationOutput, generate, generate_with_stats
from torchft.generation._loading import adapter_build_kwargs, load_model
from torchft.generation._prompt import encode_prompt
from torchft.generation._sampling import sample_next_token

__all__ = [
    "GenerationOutput", "adapter_build_kwargs", "encode_prompt", "generate", "generate_with_stats", "load_model", "sample_next_token",
]
