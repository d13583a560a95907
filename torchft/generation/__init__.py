"""Text generation: sampling and KV-cache decoding for torchft models."""
from torchft.generation._generate import GenerationOutput, generate, generate_with_stats
from torchft.generation._sampling import sample_next_token

__all__ = ["GenerationOutput", "generate", "generate_with_stats", "sample_next_token"]
