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


def load_lr_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Restore a scheduler saved with ``state_dict()`` and put its current LR back into the optimizer.

    (Building a scheduler resets the optimizer's LR to the step-0 value; loading the scheduler's
    state alone would only correct it at the next ``step()``.)
    """
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
