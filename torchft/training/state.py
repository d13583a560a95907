"""What a resumable checkpoint holds beyond the weights, and how it is put back.

``training_state.pt`` = {step, optimizer, lr_scheduler, dataloader, rng, (adapter)}: with these a
resumed run draws the same batches, the same dropout masks and the same learning rates as the run
that was interrupted, so its loss curve continues exactly.
"""
import logging
from collections.abc import Mapping

import torch

from torchft.training.lr_schedule import load_lr_scheduler_state
from torchft.training.rng import get_rng_state, set_rng_state

log = logging.getLogger("torchft")


def training_state(step: int, optimizer: torch.optim.Optimizer, lr_scheduler, dataloader,
                   adapter_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict:
    """The state to save after optimizer step ``step`` (tensors moved to CPU by ``torch.save``'s caller)."""
    state = {
        "step": int(step),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "dataloader": dataloader.state_dict(),
        "rng": get_rng_state(),
    }
    if adapter_state_dict is not None:
        state["adapter"] = {k: v.detach().cpu() for k, v in adapter_state_dict.items()}
    return state


def restore_training_state(state: Mapping, optimizer: torch.optim.Optimizer, lr_scheduler, dataloader) -> int:
    """Put the optimizer, LR schedule, data position and RNG back; returns the step to continue after.

    The LR schedule keeps this run's shape (its total steps may differ from the saved run's) and
    continues from the saved step."""
    missing = [k for k in ("step", "optimizer", "lr_scheduler", "dataloader", "rng") if k not in state]
    if missing:
        raise ValueError(f"training state lacks {', '.join(missing)}: it was not written by this recipe")
    optimizer.load_state_dict(state["optimizer"])
    restore_lr_schedule(lr_scheduler, state["lr_scheduler"])
    dataloader.load_state_dict(state["dataloader"])
    set_rng_state(state["rng"])
    return int(state["step"])


def restore_lr_schedule(lr_scheduler, saved: Mapping, is_main_process: bool = True) -> None:
    """Continue the saved schedule from its step, over this run's total steps (a resume with another
    ``max_steps`` follows the new schedule, on one device and many); say so once when they differ."""
    saved_total = load_lr_scheduler_state(lr_scheduler, saved)
    if saved_total is not None and is_main_process:
        log.warning("the checkpoint's LR schedule spanned %d steps; this run's spans its own total "
                    "(max_steps / epochs), from the resumed step on", saved_total)
