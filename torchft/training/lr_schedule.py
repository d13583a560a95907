"""Learning-rate schedules: a warm-up then cosine, linear or constant.

Each is a ``torch.optim.lr_scheduler.LambdaLR`` whose lambda is a picklable object, so the
scheduler's ``state_dict()`` (the step counter) saves and restores with the rest of the run.
"""
import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class _WarmupThen:
    """LR multiplier at ``step``: linear warm-up to 1, then the chosen decay down to ``min_lr_ratio``."""

    name: str
    num_warmup_steps: int
    num_training_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return (step + 1) / (self.num_warmup_steps + 1)
        if self.name == "constant":
            return 1.0
        decay_steps = max(1, self.num_training_steps - self.num_warmup_steps)
        progress = min(1.0, (step - self.num_warmup_steps) / decay_steps)
        if self.name == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # linear
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    num_warmup_steps: int = 0,
    num_training_steps: int = 1,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is scaled.
        name: ``cosine``, ``linear`` (both decay to ``min_lr_ratio * lr`` at ``num_training_steps``)
            or ``constant``.
        num_warmup_steps: steps of linear warm-up from ``lr / (num_warmup_steps + 1)`` to ``lr``.
        num_training_steps: total optimizer steps of the run.
        min_lr_ratio: the final LR as a fraction of the peak LR.
    """
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler.name ({name}) must be one of {', '.join(SCHEDULES)}")
    if num_warmup_steps < 0:
        raise ValueError(f"lr_scheduler.num_warmup_steps ({num_warmup_steps}) must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.min_lr_ratio ({min_lr_ratio}) must be in [0, 1]")
    fn = _WarmupThen(name, int(num_warmup_steps), max(1, int(num_training_steps)), float(min_lr_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def load_lr_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> int | None:
    """Restore a scheduler saved with ``state_dict()``: its step counter and peak LR. The schedule's
    shape (warm-up, total steps, decay) stays the one this run was built with, so a run resumed with
    another ``max_steps`` follows a schedule over the new total instead of the old one (whose LR
    would be 0 after the old end). The current LR is put back into the optimizer.

    Returns the total steps of the saved schedule when it differs from this one, else None.
    """
    built = scheduler.state_dict()
    saved_total = _saved_total(state)
    scheduler.load_state_dict({**state, "lr_lambdas": built["lr_lambdas"]})
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep the LR as a tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs
    current_total = getattr(scheduler.lr_lambdas[0], "num_training_steps", None)
    return saved_total if saved_total is not None and saved_total != current_total else None


def _saved_total(state: dict) -> int | None:
    lambdas = state.get("lr_lambdas") or [None]
    return lambdas[0].get("num_training_steps") if isinstance(lambdas[0], dict) else None
