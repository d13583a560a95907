"""Evaluate a model with lm-eval: ``tune run eleuther_eval --config eleuther_evaluation tasks=[hellaswag]``.

Reads top to bottom: load the tokenizer and the model (plus adapter, which must change the logits),
run the tasks through torchft's lm-eval wrapper, print the table and write ``results.json``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from torchft.config import check_start, instantiate, log_and_save_config, recipe_main
from torchft.eval import evaluate, task_manager_for
from torchft.generation import load_model
from torchft.training.precision import resolve_device, resolve_dtype

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    check_start(cfg)  # batch_size and output_dir, as `tune validate` reports them; nothing written yet
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tasks = list(cfg.tasks) if not isinstance(cfg.tasks, str) else [cfg.tasks]

    # Task names are checked before the (slow) model load; an unknown one lists close names.
    include_path = cfg.get("include_path")
    if include_path is not None and not isinstance(include_path, str):
        include_path = list(include_path)
    task_manager = task_manager_for(tasks, include_path, include_defaults=cfg.include_default_tasks)

    tokenizer = instantiate(cfg.tokenizer)
    model = load_model(cfg.checkpoint_dir, adapter_dir=cfg.get("adapter_dir"), device=device, dtype=dtype)
    log_and_save_config(cfg, cfg.output_dir)  # the model loaded: a run refused before writes nothing

    results = evaluate(
        model, tokenizer, tasks, limit=cfg.get("limit"), num_fewshot=cfg.get("num_fewshot"),
        batch_size=cfg.batch_size, max_seq_len=cfg.get("max_seq_len"), max_gen_toks=cfg.max_gen_toks,
        log_samples=cfg.log_samples, seed=cfg.seed, task_manager=task_manager, add_bos=cfg.get("add_bos"),
    )

    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results), flush=True)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    summary = {
        "results": results["results"],
        "n-shot": results.get("n-shot"),
        "n-samples": results.get("n-samples"),
        "versions": results.get("versions"),
        "checkpoint_dir": str(cfg.checkpoint_dir),
        "adapter_dir": cfg.get("adapter_dir"),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=handle_non_serializable))
    for task, rows in (samples or {}).items():
        with open(out_dir / f"samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    log.info("results written to %s", out_dir / "results.json")


if __name__ == "__main__":
    recipe_main(main)
