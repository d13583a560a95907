"""Generate text from a (fine-tuned) model: ``tune run generate --config generation prompt="..."``.

Reads top to bottom: load the tokenizer and the model (plus adapter), encode the prompt (plain text or
chat messages), decode with the KV cache, print the text and the speed.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from torchft.config import instantiate, recipe_main
from torchft.generation import encode_prompt, generate_with_stats, load_model
from torchft.training.precision import resolve_device, resolve_dtype

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # Cheap checks first, before the tokenizer and the (slow) model load.
    if cfg.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens ({cfg.max_new_tokens}) must be > 0")
    prompt = cfg.prompt
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError('prompt is empty: pass some text, e.g. prompt="Tell me a story"')
    if not isinstance(prompt, str):  # a list of {role, content} messages from the YAML
        prompt = OmegaConf.to_container(prompt, resolve=True)

    # 1. Tokenizer and prompt.
    tokenizer = instantiate(cfg.tokenizer)
    prompt_tokens = encode_prompt(tokenizer, prompt, chat=cfg.chat, system_prompt=cfg.get("system_prompt"))

    # 2. Model (with the adapter when adapter_dir is set).
    model = load_model(cfg.checkpoint_dir, adapter_dir=cfg.get("adapter_dir"), device=device, dtype=dtype)

    # 3. Decode. Stop tokens come from the tokenizer's chat format (Llama 3: <|eot_id|>, <|end_of_text|>).
    out = generate_with_stats(
        model, prompt_tokens, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.get("top_k"),
        top_p=cfg.get("top_p"), stop_tokens=tokenizer.stop_tokens, seed=cfg.seed, pad_id=tokenizer.pad_id or 0,
        compile=cfg.compile,
    )
    print(tokenizer.decode(out.tokens[0], skip_special_tokens=True), flush=True)
    log.info(
        "prompt %d tokens, generated %d tokens | prefill %.3f s | decode %.1f tokens/s | peak memory %.2f GiB (%s)",
        out.prompt_tokens, len(out.tokens[0]), out.prefill_seconds, out.tokens_per_second, out.peak_memory_gib,
        "CUDA allocated" if device.type == "cuda" else "process RSS",
    )


if __name__ == "__main__":
    recipe_main(main)
