"""Shared set-up of the fine-tuning recipe tests: a tiny base model, a small dataset, a config."""
import json
from pathlib import Path

from torchft.config import load_config
from torchft.data._assets import QUICKSTART_SPLITS, assets_path
from torchft.training.quickstart import tiny_base_model

# dim 64, 2 layers, 4 heads, 2 kv heads; the quickstart tokenizer's vocabulary (1024)
TINY = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128, max_seq_len=256)
# QLoRA: every adapted linear's numel a multiple of 64 * 256 (NF4 blocks and double-quantized scales)
TINY_NF4 = dict(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=4, intermediate_dim=256, max_seq_len=256)


def make_base(root: Path, dims: dict = TINY) -> Path:
    return tiny_base_model(str(root / "base"), seed=0, **dims)


def make_data(root: Path, train_rows: int = 32, val_rows: int = 8) -> tuple[Path, Path]:
    """The first rows of the quickstart splits, as local JSONL files (the `source=json` path users take)."""
    paths = []
    for split, n in (("train", train_rows), ("validation", val_rows)):
        lines = Path(assets_path(QUICKSTART_SPLITS[split])).read_text().splitlines()[:n]
        path = root / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return tuple(paths)


def tiny_config(recipe: str, root: Path, base: Path, overrides=()):
    """The quickstart config of ``recipe`` ("lora" or "full") pointed at the tiny base and data."""
    root.mkdir(parents=True, exist_ok=True)
    train, val = make_data(root)
    cfg = load_config(f"quickstart/{recipe}_single_device", [
        "~base_model",
        f"output_dir={root / 'out'}",
        f"checkpointer.checkpoint_dir={base}",
        "dataset.source=json", f"dataset.data_files={train}",  # the contract's way to a local file
        "validation_dataset.source=json", f"validation_dataset.data_files={val}",
        "batch_size=4", "max_steps=4", "eval_every_n_steps=2", "save_every_n_steps=100",
        "progress_bar=false", "sample_prompts=null", "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=0",
        *overrides,
    ])
    return cfg


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir) if "loss" in m}


def val_losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in read_metrics(output_dir) if "val_loss" in m}


def restore_torch_threads():
    """Generator for an autouse fixture: the quickstart configs set one intra-op thread; put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fresh_schedule_lrs(name: str, total_steps: int, lr: float) -> dict[int, float]:
    """The LR each step 1..total_steps trains with under a fresh ``name`` schedule (no warm-up): what
    a run resumed with ``max_steps=total_steps`` must follow, on one device and many."""
    import torch

    from torchft.training.lr_schedule import build_lr_scheduler

    sched = build_lr_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr), name,
                               num_training_steps=total_steps)
    lrs = {}
    for step in range(1, total_steps + 1):  # the LR logged at step k is set after k - 1 updates
        lrs[step] = sched.get_last_lr()[0]
        sched.optimizer.step(), sched.step()
    return lrs


PAST_THE_LAST_STEP = (r"resume_from_checkpoint is at step {step}, past this run's last step \({last}, from "
                      r"max_steps / epochs\): raise max_steps above {step} or resume an earlier step")
SCHEDULE_CHANGED = "the checkpoint's LR schedule spanned {saved} steps; this run's spans its own total"


def assert_resume_from_step_2_of_4_is_exact(full: Path, resumed: Path) -> None:
    """A 4-step adapter run resumed from its step_2: steps 3 and 4 log the same losses, step_4 the same adapter."""
    import torch
    from safetensors.torch import load_file

    losses = {run: train_losses(run) for run in (full, resumed)}
    assert list(losses[resumed]) == [3, 4]
    assert [losses[resumed][s] for s in (3, 4)] == [losses[full][s] for s in (3, 4)]
    adapters = [load_file(run / "step_4" / "adapter" / "adapter_model.safetensors") for run in (full, resumed)]
    assert sorted(adapters[0]) == sorted(adapters[1])
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
