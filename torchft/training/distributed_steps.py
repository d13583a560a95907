"""The train step and validation loss of a sharded (data-parallel) run.

Under data parallelism the step must give the update one device would give with every rank's
samples in one batch: the loss is divided by the global count of target tokens, and every value
that decides what happens next (the loss, the gradient norm) is the same on every rank.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from torchft.training.distributed import all_reduce_sum, full_tensor


def sharded_forward_backward(model: nn.Module, micro_batches: Sequence[dict], loss_fn,
                             offload_activations: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps.forward_backward`` under data parallelism: the same gradients as one device with every
    rank's samples in one batch. Returns the global mean loss (the same on every rank, so the
    non-finite check decides alike everywhere) and the global target-token count."""
    from torchft.training.steps import sft_loss_sum, step_target_tokens

    device = micro_batches[0]["tokens"].device
    num_tokens = all_reduce_sum(torch.tensor(step_target_tokens(micro_batches, loss_fn.ignore_index),
                                             dtype=torch.float32, device=device))  # [] global count
    # params=None: the output projection's parameters are looked up after the forward (FSDP gathers them)
    batch_loss = partial(sft_loss_sum, model, loss_fn=loss_fn, offload_activations=offload_activations)
    total = sharded_accumulate_gradients(model, micro_batches, batch_loss, num_tokens)
    return total / num_tokens.clamp(min=1), num_tokens


def sharded_accumulate_gradients(model: nn.Module, micro_batches: Sequence[dict],
                                 batch_loss: Callable[[dict], torch.Tensor], global_denominator: torch.Tensor):
    """``steps.accumulate_gradients`` under data parallelism, for any summed loss (cross-entropy, DPO,
    distillation): each rank's summed loss is divided by ``global_denominator``, the normalizer over
    the whole step on all ranks (e.g. the all-reduced target-token count); gradients are reduced once,
    after the last micro-batch. FSDP averages gradients over the ranks, so each rank's loss is scaled
    by their number to make the reduction the sum over every rank. Returns [] the sum of every rank's
    micro-batch losses (the same on every rank).
    """
    from torchft.training.steps import accumulate_gradients

    sharded = hasattr(model, "set_requires_gradient_sync")
    ranks = dist.get_world_size() if sharded else 1
    denominator = global_denominator.clamp(min=1) / ranks  # a step whose labels are all masked learns nothing

    def sync_with_the_last(i: int) -> None:  # accumulate locally; reduce-scatter with the last backward only
        model.set_requires_gradient_sync(i == len(micro_batches) - 1)

    total = accumulate_gradients(micro_batches, batch_loss, denominator, sync_with_the_last if sharded else None)
    return all_reduce_sum(total)


def sharded_optimizer_step(model: nn.Module, micro_batches: Sequence[dict], loss_fn, optimizer, lr_scheduler, *,
                           max_grad_norm: float | None = None, offload_activations: bool = False):
    """``steps.optimizer_step`` with :func:`sharded_forward_backward`: the norm is that of the sharded
    gradients over all ranks (a plain tensor, the same everywhere), so every rank skips a non-finite
    update alike. Returns a ``StepResult`` of global values."""
    from torchft.training.steps import StepResult, step_tokens, update_weights

    loss, num_target_tokens = sharded_forward_backward(model, micro_batches, loss_fn, offload_activations)
    grad_norm, found_inf = update_weights(optimizer, lr_scheduler, loss, max_grad_norm, global_norm=full_tensor)
    num_tokens = all_reduce_sum(torch.tensor(step_tokens(micro_batches), device=loss.device))
    return StepResult(loss, num_target_tokens, grad_norm, found_inf, num_tokens)


@torch.no_grad()
def sharded_validation_loss(model: nn.Module, batches, loss_fn, device: torch.device) -> float:
    """Token-weighted mean loss over every rank's validation batches.

    Each rank must run the same count of batches (the forwards are collectives): ``build_dataloader``
    with ``drop_last=False`` pads the samples to a multiple of the world size with masked copies, so
    every sample counts once and the result equals one device's.
    """
    from torchft.modules.loss import shift_targets
    from torchft.training.steps import to_device

    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, target tokens]
    try:
        for batch in batches:
            batch = to_device(batch, device)
            hidden = model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
            loss_sum, n = loss_fn(hidden, shift_targets(batch["labels"], loss_fn.ignore_index), model.output)
            sums += torch.stack([loss_sum.double(), torch.as_tensor(n, dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    all_reduce_sum(sums)
    if sums[1] == 0:
        raise ValueError("the validation dataset has no target tokens (every label is masked)")
    return float(sums[0] / sums[1])

