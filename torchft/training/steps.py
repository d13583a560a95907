"""The train step and the validation loss, shared by the fine-tuning recipes.

Token-weighted loss (one optimizer step = ``gradient_accumulation_steps`` micro-batches): every
micro-batch's summed loss is divided by the number of target tokens of the whole step before its
backward, so the accumulated gradient is exactly the gradient of the mean over all of the step's
target tokens. 4 micro-batches of 1 sample and 1 micro-batch of 4 samples give the same update.
"""
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from torchft.data.collate import count_target_tokens
from torchft.modules.loss import IGNORE_INDEX, ChunkedCrossEntropy, output_params, shift_targets
from torchft.training.activations import activation_offloading
from torchft.training.optim import OptimizerInBackward, clip_grad_norm, nonfinite_flag, step_unless_nonfinite
from torchft.training.setup import run_length_problems


@dataclass
class StepResult:
    """What one optimizer step returns to the loop (global values under data parallelism).

    ``loss``: [] fp32 mean loss over the step's target tokens, on the device (read back only when
    logged). ``num_target_tokens``: tokens that carried a loss; ``num_tokens``: all tokens fed to the
    model (padding excluded), for tokens/s and MFU. ``grad_norm``: [] the gradient norm before
    clipping. ``found_inf``: [] 1.0 when the loss or a gradient was NaN/infinite (the update was
    skipped on the device), else 0.0. ``metrics``: more [] values to log under their names (read back
    only on logging steps), e.g. DPO's ``rewards/accuracies``.
    """

    loss: torch.Tensor
    num_target_tokens: int | torch.Tensor
    grad_norm: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    num_tokens: int | torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] | None = None


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite; training stopped without saving."""


# The settings that lower memory, named in the out-of-memory message.
MEMORY_SETTINGS = (
    "batch_size (then raise gradient_accumulation_steps to keep the same tokens per step)",
    "enable_activation_checkpointing=true",
    "enable_activation_offloading=true",
    "dataset.max_seq_len / tokenizer.max_seq_len",
    "dtype=bf16",
    "a QLoRA config (NF4 base weights)",
)


def out_of_memory_message(step: int, micro_batch: dict) -> str:
    """One line naming what ran out (at which step, on which batch shape) and the settings that lower memory."""
    batch_size, seq_len = micro_batch["tokens"].shape
    return (f"out of GPU memory at step {step} (batch_size={batch_size}, sequence length {seq_len}); "
            f"lower memory with: {'; '.join(MEMORY_SETTINGS)}")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a collated batch to ``device`` without waiting for the device.

    A copy from pageable host memory waits for the work queued before it; from pinned memory it
    does not, so CPU tensors bound for a GPU are pinned first (a host-side copy).
    """
    device = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_micro_batches(loader, count: int) -> Iterator[list[dict]]:
    """The micro-batches of each optimizer step, epoch after epoch: ``count`` at a time, and the rest
    of an epoch as its last (shorter) step, so a step never mixes two epochs.

    ``loader`` is iterated once per epoch and continues from its restored position after a resume
    (saves happen between steps, so the steps stay aligned with the epochs). It draws no global
    randomness, so dropout masks after a resume are those of the uninterrupted run. The loss stays
    token-weighted over whatever the step holds.
    """
    while True:
        step: list[dict] = []
        empty = True
        for batch in loader:
            empty = False
            step.append(batch)
            if len(step) == count:
                yield step
                step = []
        if step:
            yield step
        if empty and not step:
            raise ValueError("the training data loader yielded no batch")


def step_target_tokens(micro_batches: Sequence[dict], ignore_index: int = IGNORE_INDEX) -> int:
    """Tokens that carry a loss in the step: the collate function's counts (labels counted on the CPU),
    or counted here for batches built without it."""
    return sum(b["num_target_tokens"] if "num_target_tokens" in b else count_target_tokens(b["labels"], ignore_index)
               for b in micro_batches)


def step_tokens(micro_batches: Sequence[dict]) -> int:
    """Tokens fed to the model in the step (padding excluded when the collate function counted it)."""
    return sum(b.get("num_tokens", b["tokens"].numel()) for b in micro_batches)


def sft_loss_sum(model: nn.Module, batch: dict, loss_fn: ChunkedCrossEntropy,
                 params: Sequence[torch.Tensor] | None = None, offload_activations: bool = False) -> torch.Tensor:
    """[] the summed next-token cross-entropy of one micro-batch (graph attached, for backward).

    ``batch`` holds ``tokens`` [b, s] and ``labels`` [b, s] (aligned with the tokens, -100 where no
    loss) and, for packed batches, ``mask`` and ``input_pos``. ``params``: the output projection's
    trainable parameters the fused loss differentiates; None looks them up after the forward (under
    FSDP they are the root unit's gathered parameters, which exist only then).
    """
    with activation_offloading(offload_activations, batch["tokens"].device):  # the layers' saved inputs only
        hidden = model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
    extra = {"batch": batch} if getattr(loss_fn, "uses_batch", False) else {}  # a KD loss runs its teacher on it
    loss_sum, _ = loss_fn(hidden, shift_targets(batch["labels"], loss_fn.ignore_index), model.output,
                          output_params(model) if params is None else params, **extra)
    return loss_sum


def accumulate_gradients(micro_batches: Sequence[dict], batch_loss: Callable[[dict], torch.Tensor],
                         denominator: int | torch.Tensor,
                         before_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Backward of every micro-batch's ``batch_loss(batch) / denominator``: gradients accumulate in
    ``.grad`` as if the step's micro-batches were one batch whose loss is the sum over them divided by
    ``denominator``. ``batch_loss`` is any summed loss (cross-entropy, DPO, distillation);
    ``before_batch(i)`` runs before micro-batch ``i`` (e.g. to sync gradients only with the last).
    Returns [] fp32, the detached sum of the micro-batches' losses.
    """
    total = torch.zeros((), dtype=torch.float32, device=micro_batches[0]["tokens"].device)
    for i, batch in enumerate(micro_batches):
        if before_batch is not None:
            before_batch(i)
        loss_sum = batch_loss(batch)
        (loss_sum / denominator).backward()
        total += loss_sum.detach()
    return total


def forward_backward(
    model: nn.Module,
    micro_batches: Sequence[dict],
    loss_fn: ChunkedCrossEntropy,
    output_params: Sequence[torch.Tensor] = (),
    offload_activations: bool = False,
    num_target_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches (already on the model's device;
    see :func:`sft_loss_sum` for what a batch holds).

    Gradients accumulate in ``.grad``; the caller clips and steps the optimizer.
    ``num_target_tokens`` is the loss's denominator: by default these micro-batches' target tokens; a
    data-parallel caller passes the count over all ranks. Returns the step's mean loss (a detached
    fp32 scalar) and the denominator.
    """
    if num_target_tokens is None:
        num_target_tokens = step_target_tokens(micro_batches, loss_fn.ignore_index)
    if isinstance(num_target_tokens, int) and num_target_tokens == 0:  # every label masked: nothing to learn
        return torch.zeros((), dtype=torch.float32, device=micro_batches[0]["tokens"].device), 0
    batch_loss = partial(sft_loss_sum, model, loss_fn=loss_fn, params=output_params,
                         offload_activations=offload_activations)
    return accumulate_gradients(micro_batches, batch_loss, num_target_tokens) / num_target_tokens, num_target_tokens


@torch.no_grad()
def validation_loss(model: nn.Module, batches, loss_fn: ChunkedCrossEntropy, device: torch.device,
                    max_batches: int | None = None) -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (at most ``max_batches``), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in itertools.islice(batches, max_batches):
            batch = to_device(batch, device)
            hidden = model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
            loss_sum, n = loss_fn(hidden, shift_targets(batch["labels"], loss_fn.ignore_index), model.output)
            total += float(loss_sum)
            count += int(n)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the validation dataset has no target tokens (every label is masked)")
    return total / count


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss or gradients were not finite; ``check``
    reads that back (one host-device sync) and stops the run naming the last good checkpoint.

    The step itself never syncs: its update was skipped on the device (``StepResult.found_inf``), so
    the weights stay those of the last good step; the loop calls ``check`` when it reads metrics
    back anyway (logging steps) and always before a save, so no save ever holds a bad step.
    """

    def __init__(self):
        self._first: torch.Tensor | None = None  # [] int64: the first bad step, 0 while none
        self._loss: torch.Tensor | None = None  # [] the loss of that step
        self._grad_norm: torch.Tensor | None = None  # [] its gradient norm

    def update(self, step: int, result: StepResult) -> None:
        if result.found_inf is None:
            return
        loss = result.loss.detach().float()
        norm = result.grad_norm.detach().float() if result.grad_norm is not None else torch.zeros_like(loss)
        if self._first is None:
            self._first = torch.zeros((), dtype=torch.int64, device=loss.device)
            self._loss, self._grad_norm = torch.zeros_like(loss), torch.zeros_like(loss)
        new = (result.found_inf > 0) & (self._first == 0)  # [] bool: this step is the first bad one
        self._first = torch.where(new, step, self._first)
        self._loss = torch.where(new, loss, self._loss)
        self._grad_norm = torch.where(new, norm, self._grad_norm)

    def check(self, last_checkpoint: str | None) -> None:
        """Raise :class:`NonFiniteLossError` when a step since the start was not finite."""
        if self._first is None:
            return
        first, loss, norm = (t.item() for t in (self._first, self._loss, self._grad_norm))  # the one sync
        if first == 0:
            return
        where = (f"the last good checkpoint is {last_checkpoint} (resume_from_checkpoint={last_checkpoint})"
                 if last_checkpoint else "no checkpoint was written before it")
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4f})"
        raise NonFiniteLossError(
            f"{what} at step {first}: training stopped (that step's update was skipped; try a lower "
            f"optimizer.lr, clip_grad_norm, or dtype=fp32); {where}"
        )


def total_training_steps(max_steps: int | None, epochs: float | None, batches_per_epoch: int,
                         gradient_accumulation_steps: int) -> int:
    """Optimizer steps of the run: ``max_steps``, ``epochs`` worth of steps, or the smaller of the two.

    An epoch has ``ceil(batches_per_epoch / gradient_accumulation_steps)`` steps (its last one takes
    the remaining batches, see :func:`step_micro_batches`).
    """
    problems = run_length_problems(max_steps, epochs)
    if problems:
        raise ValueError("; ".join(problems))
    candidates = [] if max_steps is None else [max_steps]
    if epochs is not None:
        steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
        candidates.append(max(1, math.ceil(epochs * steps_per_epoch)))
    return min(candidates)


def check_resume_step(start_step: int, total_steps: int) -> None:
    """A run resumed at ``start_step`` must have steps left before its last one (``total_steps``):
    a finished run resumed as it is would exit at once, so one line says how to continue instead."""
    if start_step == total_steps:
        raise ValueError(f"step {start_step} is already the last one (this run has {total_steps} steps): nothing "
                         f"to train; to continue, raise max_steps (e.g. max_steps={2 * total_steps})")
    if start_step > total_steps:
        raise ValueError(f"resume_from_checkpoint is at step {start_step}, past this run's last step "
                         f"({total_steps}, from max_steps / epochs): raise max_steps above {start_step} or resume "
                         f"an earlier step")


def optimizer_step(model: nn.Module, micro_batches: Sequence[dict], loss_fn: ChunkedCrossEntropy, optimizer,
                   lr_scheduler, *, max_grad_norm: float | None = None, offload_activations: bool = False,
                   num_target_tokens: int | torch.Tensor | None = None) -> StepResult:
    """One optimizer step over ``micro_batches``: token-weighted forward/backward, the gradient norm
    (clipped to ``max_grad_norm`` unless None), the update unless the loss or a gradient is not
    finite (decided on the device: nothing is read back), then the LR schedule.

    The parameters are the optimizer's; ``num_target_tokens`` as in :func:`forward_backward`.
    With an :class:`OptimizerInBackward` the updates (each skipped alike when not finite) happened
    during backward and the norm is that of the unclipped gradients.
    """
    loss, num_target_tokens = forward_backward(model, micro_batches, loss_fn, output_params(model),
                                               offload_activations, num_target_tokens)
    if isinstance(optimizer, OptimizerInBackward):
        grad_norm, found_inf = optimizer.step_stats(loss)
        optimizer.step()  # nothing left to do; keeps the LR scheduler's step-order check satisfied
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
    else:
        grad_norm, found_inf = update_weights(optimizer, lr_scheduler, loss, max_grad_norm)
    return StepResult(loss, num_target_tokens, grad_norm, found_inf, step_tokens(micro_batches))


def update_weights(optimizer, lr_scheduler, loss: torch.Tensor, max_grad_norm: float | None = None,
                   global_norm: Callable[[torch.Tensor], torch.Tensor] = lambda norm: norm):
    """After the step's backward: the gradient norm (clipped to ``max_grad_norm`` unless None), the
    update unless the loss or a gradient is not finite (decided on the device: nothing is read back),
    the gradients freed, then the LR schedule. ``global_norm`` makes the norm a plain tensor, the same on
    every rank, when the gradients are sharded. Returns ([] grad norm, [] found_inf)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = global_norm(clip_grad_norm(params, max_grad_norm))
    found_inf = nonfinite_flag(loss, grad_norm)
    step_unless_nonfinite(optimizer, found_inf)  # the first step also allocates the optimizer state
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return grad_norm, found_inf
