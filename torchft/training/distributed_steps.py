"""The train step and validation loss of a sharded (data-parallel) run.

Under data parallelism the step must give the update one device would give with every rank's
samples in one batch: the loss is divided by the global count of target tokens, and every value
that decides what happens next (the loss, the gradient norm) is the same on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from torchft.training.activations import activation_offloading
from torchft.training.distributed import all_reduce_sum, full_tensor


def sharded_forward_backward(model: nn.Module, micro_batches: Sequence[dict], loss_fn,
                             offload_activations: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps.forward_backward`` under data parallelism: the same gradients as one device with every
    rank's samples in one batch.

    Each rank's summed loss is divided by the target tokens of the whole step on all ranks (an
    all-reduce before the first backward); gradients are reduced once, after the last micro-batch.
    FSDP averages gradients over the ranks, so each rank's loss is scaled by their number to make
    the reduction the sum over all of the step's tokens. Returns the global mean loss (the same on
    every rank, so the non-finite check decides alike everywhere) and the global target-token count.

    The fused loss differentiates the output projection's parameters itself; under FSDP those are the
    root unit's gathered parameters, which exist only after ``hidden_states``: they are looked up then.
    """
    from torchft.modules.loss import output_params, shift_targets
    from torchft.training.steps import step_target_tokens

    device = micro_batches[0]["tokens"].device
    num_tokens = all_reduce_sum(torch.tensor(step_target_tokens(micro_batches, loss_fn.ignore_index),
                                             dtype=torch.float32, device=device))  # [] global count
    sharded = hasattr(model, "set_requires_gradient_sync")
    ranks = dist.get_world_size() if sharded else 1
    denominator = num_tokens.clamp(min=1) / ranks  # a step whose labels are all masked learns nothing
    total = torch.zeros((), dtype=torch.float32, device=device)
    for i, batch in enumerate(micro_batches):
        if sharded:  # accumulate locally; reduce-scatter only with the last micro-batch's backward
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        with activation_offloading(offload_activations, device):  # the layers' saved inputs, not the loss's
            hidden = model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
        loss_sum, _ = loss_fn(hidden, shift_targets(batch["labels"], loss_fn.ignore_index), model.output,
                              output_params(model))
        (loss_sum / denominator).backward()
        total += loss_sum.detach()
    return all_reduce_sum(total) / num_tokens.clamp(min=1), num_tokens


def sharded_optimizer_step(model: nn.Module, micro_batches: Sequence[dict], loss_fn, optimizer, lr_scheduler, *,
                           max_grad_norm: float | None = None, offload_activations: bool = False):
    """``steps.optimizer_step`` with :func:`sharded_forward_backward`: the norm is that of the sharded
    gradients over all ranks (a plain tensor, the same everywhere), so every rank skips a non-finite
    update alike. Returns a ``StepResult`` of global values."""
    from torchft.training.optim import clip_grad_norm, nonfinite_flag, step_unless_nonfinite
    from torchft.training.steps import StepResult, step_tokens

    loss, num_target_tokens = sharded_forward_backward(model, micro_batches, loss_fn, offload_activations)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = full_tensor(clip_grad_norm(params, max_grad_norm))
    found_inf = nonfinite_flag(loss, grad_norm)
    step_unless_nonfinite(optimizer, found_inf)
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
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

