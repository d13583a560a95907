"""Turn a recipe's ``prompt`` (plain text or chat messages) into token ids."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def encode_prompt(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    *,
    chat: bool = False,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids to generate from.

    Args:
        prompt: plain text, or a list of ``{"role": ..., "content": ...}`` messages (always chat).
        chat: wrap plain text as one user message in the tokenizer's chat format.
        system_prompt: a system message put first (chat only).

    Plain text gets BOS and no EOS. Chat prompts end with the assistant header, so the model answers;
    generation should then stop at ``tokenizer.stop_tokens`` (for Llama 3, ``<|eot_id|>``).
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError('prompt is empty: pass some text, e.g. prompt="Tell me a story"')
        if not chat:
            if system_prompt:
                raise ValueError("system_prompt needs chat=true (plain text prompts have no system turn)")
            return list(tokenizer.encode(prompt, add_bos=True, add_eos=False))
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        if not messages or not any(str(m.get("content", "")).strip() for m in messages):
            raise ValueError("prompt is empty: the message list has no content")
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    tokens, _ = tokenizer.tokenize_messages(messages, add_eos=False, add_generation_prompt=True)
    return list(tokens)
