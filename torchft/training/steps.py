"""The train step and the validation loss, shared by the fine-tuning recipes.

Token-weighted loss (one optimizer step = ``gradient_accumulation_steps`` micro-batches): every
micro-batch's summed loss is divided by the number of target tokens of the whole step before its
backward, so the accumulated gradient is exactly the gradient of the mean over all of the step's
target tokens. 4 micro-batches of 1 sample and 1 micro-batch of 4 samples give the same update.
"""
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchft.modules.loss import IGNORE_INDEX, ChunkedCrossEntropy, shift_targets
from torchft.training.activations import activation_offloading
from torchft.training.optim import clip_grad_norm


@dataclass
class StepResult:
    """What one optimizer step returns to the loop (global values under data parallelism).

    ``loss``: [] fp32 mean loss over the step's target tokens, on the device (read back only when
    logged). ``num_target_tokens``: tokens that carried a loss. ``grad_norm``: [] the gradient norm
    before clipping, or None when not computed.
    """

    loss: torch.Tensor
    num_target_tokens: int | torch.Tensor
    grad_norm: torch.Tensor | None = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without saving."""


# The settings that lower memory, named in the out-of-memory message.
MEMORY_SETTINGS = (
    "batch_size (then raise gradient_accumulation_steps to keep the same tokens per step)",
    "enable_activation_checkpointing=true",
    "enable_activation_offloading=true",
    "dataset.max_seq_len / tokenizer.max_seq_len",
    "dtype=bf16",
    "a QLoRA config (NF4 base weights)",
)


def out_of_memory_message(step: int, batch_size: int, seq_len: int) -> str:
    """One line naming what ran out and the settings that lower memory."""
    return (f"out of GPU memory at step {step} (batch_size={batch_size}, sequence length {seq_len}); "
            f"lower memory with: {'; '.join(MEMORY_SETTINGS)}")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a collated batch to ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def next_micro_batches(batches: Iterator[dict], count: int) -> list[dict]:
    """The next ``count`` micro-batches of one optimizer step (the loader draws no global randomness,
    so dropout masks after a resume are those of the uninterrupted run)."""
    return [next(batches) for _ in range(count)]


def count_target_tokens(micro_batches: Sequence[dict], ignore_index: int = IGNORE_INDEX) -> int:
    """Tokens that carry a loss in the step: next-token labels that are not ``ignore_index``."""
    return sum(int((b["labels"][:, 1:] != ignore_index).sum()) for b in micro_batches)


def forward_backward(
    model: nn.Module,
    micro_batches: Sequence[dict],
    loss_fn: ChunkedCrossEntropy,
    output_params: Sequence[torch.Tensor] = (),
    offload_activations: bool = False,
) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches (already on the model's device).

    Each batch holds ``tokens`` [b, s] and ``labels`` [b, s] (aligned with the tokens, -100 where no
    loss) and, for packed batches, ``mask`` and ``input_pos``. Gradients accumulate in ``.grad``;
    the caller clips and steps the optimizer. Returns the step's mean loss (a detached fp32 scalar)
    and its number of target tokens.
    """
    num_tokens = count_target_tokens(micro_batches, loss_fn.ignore_index)
    device = micro_batches[0]["tokens"].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    if num_tokens == 0:  # every label masked: nothing to learn from this step
        return total, 0
    for batch in micro_batches:
        with activation_offloading(offload_activations, device):
            hidden = model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
            loss_sum, _ = loss_fn(hidden, shift_targets(batch["labels"], loss_fn.ignore_index), model.output,
                                  output_params)
        (loss_sum / num_tokens).backward()
        total += loss_sum.detach()
    return total / num_tokens, num_tokens


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


def check_finite(loss: torch.Tensor, step: int, last_checkpoint: str | None) -> None:
    """Stop the run with a clear message when ``loss`` is NaN or infinite."""
    value = float(loss)
    if value != value or value in (float("inf"), float("-inf")):
        where = (f"the last good checkpoint is {last_checkpoint} (resume_from_checkpoint={last_checkpoint})"
                 if last_checkpoint else "no checkpoint was written before it")
        raise NonFiniteLossError(
            f"loss is {value} at step {step}: training stopped (try a lower optimizer.lr, "
            f"clip_grad_norm, or dtype=fp32); {where}"
        )


def total_training_steps(max_steps: int | None, epochs: float | None, batches_per_epoch: int,
                         gradient_accumulation_steps: int) -> int:
    """Optimizer steps of the run: ``max_steps``, ``epochs`` worth of batches, or the smaller of the two."""
    candidates = []
    if max_steps is not None:
        check = int(max_steps)
        if check < 1:
            raise ValueError(f"max_steps ({max_steps}) must be a positive integer")
        candidates.append(check)
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"epochs ({epochs}) must be > 0")
        candidates.append(max(1, math.ceil(epochs * batches_per_epoch / gradient_accumulation_steps)))
    if not candidates:
        raise ValueError("set max_steps or epochs (or both: the run stops at whichever comes first)")
    return min(candidates)


def endless(loader) -> Iterator[dict]:
    """The loader's batches epoch after epoch (it moves to the next epoch by itself); resumable
    because the loader continues from its restored position."""
    while True:
        yield from loader


def optimizer_step(model: nn.Module, micro_batches: Sequence[dict], loss_fn: ChunkedCrossEntropy,
                   loss_params, optimizer, lr_scheduler, trainable_params, *, max_grad_norm: float | None,
                   offload_activations: bool, step: int, last_checkpoint: str | None,
                   batch_size: int, forward_backward_fn=None) -> StepResult:
    """One optimizer step over ``micro_batches``: token-weighted forward/backward, a finite-loss check
    before the update (a NaN never reaches the weights), gradient clipping, the update, then the LR
    schedule.

    Running out of device memory becomes a ``MemoryError`` naming the settings that lower memory.
    ``forward_backward_fn`` replaces :func:`forward_backward` (data-parallel recipes pass theirs).
    """
    try:
        loss, num_tokens = (forward_backward_fn or forward_backward)(model, micro_batches, loss_fn, loss_params, offload_activations)
        check_finite(loss, step, last_checkpoint)
        grad_norm = clip_grad_norm(trainable_params, max_grad_norm)
        optimizer.step()  # the first step also allocates the optimizer state
    except torch.OutOfMemoryError as err:
        seq_len = micro_batches[0]["tokens"].shape[1]
        raise MemoryError(out_of_memory_message(step, batch_size, seq_len)) from err
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return StepResult(loss, num_tokens, grad_norm)
