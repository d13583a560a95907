"""Launching the distributed recipes with the real torchrun (through `tune run`) on CPU processes (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

TUNE = [sys.executable, "-m", "torchft.cli.main"]


def tiny_overrides(root: Path, base: Path, train: Path, val: Path, extra=()) -> list[str]:
    """The quickstart distributed config pointed at a tiny base model and a small dataset."""
    return ["~base_model", f"output_dir={root / 'out'}", f"checkpointer.checkpoint_dir={base}",
            f"dataset.data_files={train}", f"validation_dataset.data_files={val}", "batch_size=4",
            "gradient_accumulation_steps=2", "max_steps=4", "eval_every_n_steps=2", "save_every_n_steps=2",
            "progress_bar=false", "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=0", *extra]


def single_device_overrides(extra=()) -> list[str]:
    """The same run on one device takes the global batch whole (distributed batch_size is global)."""
    return ["batch_size=4", "gradient_accumulation_steps=2", "save_every_n_steps=2", *extra]


def launch(recipe: str, config: str, overrides, nproc: int = 2, timeout: float = 180, env=None):
    """``tune run --standalone --nproc_per_node N recipe --config ... overrides``; the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TUNE_DEBUG", None)
    args = [*TUNE, "run", "--standalone", "--nproc_per_node", str(nproc), recipe, "--config", config, *overrides]
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=timeout)
