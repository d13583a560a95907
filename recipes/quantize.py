"""Quantize a model's weights with torchao: ``tune run quantize --config quantization scheme=int8_weight_only``.

Reads top to bottom: load the model (an adapter is merged first), measure perplexity on a text when
one is given, quantize every linear layer, measure again, save a folder that ``tune run generate``
and ``tune run eleuther_eval`` load as ``checkpoint_dir``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from torchft.config import check_start, instantiate, log_and_save_config, recipe_main
from torchft.eval import perplexity
from torchft.generation import check_scheme, load_model, quantize_model, save_quantized, stored_bytes
from torchft.training.precision import resolve_device, resolve_dtype

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    check_start(cfg)  # output_dir, as `tune validate` reports it
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    check_scheme(cfg.scheme, device)  # before the model load: say at once which device a scheme needs

    # 1. Model, with the adapter folded into the base weights (quantizing happens on plain linears).
    model = load_model(cfg.checkpoint_dir, adapter_dir=cfg.get("adapter_dir"), merge_adapter=True,
                       device=device, dtype=dtype)
    tokens = None
    if cfg.get("perplexity_text"):
        tokenizer = instantiate(cfg.tokenizer)
        tokens = tokenizer.encode(Path(cfg.perplexity_text).read_text(), add_bos=True, add_eos=False)
    ppl_before = perplexity(model, tokens, window=cfg.perplexity_window) if tokens else None
    bytes_before = stored_bytes(model)

    # 2. Quantize in place.
    quantize_model(model, cfg.scheme, group_size=cfg.group_size, include_lm_head=cfg.get("quantize_lm_head", True))
    ppl_after = perplexity(model, tokens, window=cfg.perplexity_window) if tokens else None
    bytes_after = stored_bytes(model)

    # 3. Save (quantized weights + quantization.json + config/tokenizer files from the input).
    extra = {"weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after, "dtype": str(dtype)}
    if tokens:
        extra.update(perplexity_before=ppl_before, perplexity_after=ppl_after, perplexity_tokens=len(tokens),
                     perplexity_text=str(cfg.perplexity_text))
        log.info("perplexity %.4f -> %.4f (%+.2f%%) on %d tokens", ppl_before, ppl_after,
                 100 * (ppl_after / ppl_before - 1), len(tokens))
    out = save_quantized(model, cfg.output_dir, scheme=cfg.scheme, group_size=cfg.group_size,
                         source_dir=cfg.checkpoint_dir, extra=extra)
    log_and_save_config(cfg, out)
    log.info("%s: weights %.1f MiB -> %.1f MiB, saved to %s", cfg.scheme, bytes_before / 2**20,
             bytes_after / 2**20, out)


if __name__ == "__main__":
    recipe_main(main)
