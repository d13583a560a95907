"""Greedy sample generations, printed before and after fine-tuning to show what changed."""
from collections.abc import Sequence

import torch
from torch import nn


def generate_samples(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of each prompt sent as a user message in the tokenizer's chat format."""
    from torchft.generation import generate

    was_training = model.training
    model.eval()
    completions = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                tokens, _ = tokenizer.tokenize_messages([{"role": "user", "content": prompt}], add_eos=False,
                                                        add_generation_prompt=True)
                new = generate(model, tokens, max_new_tokens=max_new_tokens, temperature=0.0,
                               stop_tokens=list(tokenizer.stop_tokens))
                new = [t for t in new if t not in set(tokenizer.stop_tokens)]
                completions.append(tokenizer.decode(new).strip())
    finally:
        model.clear_caches()
        model.train(was_training)
    return completions


def format_samples(title: str, prompts: Sequence[str], completions: Sequence[str]) -> str:
    lines = [title]
    for prompt, completion in zip(prompts, completions):
        lines.append(f"  {' '.join(prompt.split())!r} -> {completion!r}")
    return "\n".join(lines)


def print_samples(title: str, model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                  show: bool = True) -> None:
    """Print ``title`` and the model's greedy completion of each prompt (only where ``show``).

    A sharded (FSDP2) model generates on every rank, since each forward gathers a layer's weights from all
    ranks; the ranks compute the same tokens, and only the main process passes ``show=True``.
    """
    completions = generate_samples(model, tokenizer, prompts, max_new_tokens)
    if show:
        print(format_samples(title, prompts, completions))
