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

from torchft.training.distributed import all_reduce_sum, full_tensor


def sharded_forward_backward(model: nn.Module, micro_batches: Sequence[dict], loss_fn, _output_params=(),
                             offload_activations: bool = False) -> tuple[torch.Tensor, int]:
    """``steps.forward_backward`` under data parallelism: the same update as one device with every
    rank's samples in one batch.

    Each rank's summed loss is divided by the target tokens of the whole step on all ranks (an
    all-reduce before the first backward) and FSDP sums, not averages, the gradients; they are
    reduced once, after the last micro-batch. FSDP averages gradients over the ranks, so each rank's
    loss is scaled by their number to make the reduction the sum over all of the step's tokens. Returns the global mean loss (the same on every rank,
    so a non-finite check stops every rank alike) and the global number of target tokens.

    The fused loss differentiates the output projection's parameters itself; under FSDP those are the
    root unit's gathered parameters, which exist only after ``hidden_states``: they are looked up
    then (the recipe's own list, ``_output_params``, names the sharded ones and is not used).
    """
    from torchft.modules.loss import output_params, shift_targets
    from torchft.training.activations import activation_offloading
    from torchft.training.steps import count_target_tokens

    device = micro_batches[0]["tokens"].device
    local = count_target_tokens(micro_batches, loss_fn.ignore_index)
    num_tokens = int(all_reduce_sum(torch.tensor([local], device=device)).item())
    total = torch.zeros((), dtype=torch.float32, device=device)
    if num_tokens == 0:  # every label masked on every rank: nothing to learn from this step
        return total, 0
    sharded = hasattr(model, "set_requires_gradient_sync")
    ranks = dist.get_world_size() if sharded else 1
    for i, batch in enumerate(micro_batches):
        if sharded:  # accumulate locally; reduce-scatter only with the last micro-batch's backward
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        with activation_offloading(offload_activations, device):
            hidden = model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
            loss_sum, _ = loss_fn(hidden, shift_targets(batch["labels"], loss_fn.ignore_index), model.output,
                                  output_params(model))
        (loss_sum * ranks / num_tokens).backward()
        total += loss_sum.detach()
    return all_reduce_sum(total) / num_tokens, num_tokens


@torch.no_grad()
def sharded_validation_loss(model: nn.Module, batches, loss_fn, device: torch.device) -> float:
    """Token-weighted mean loss over every rank's validation batches (each rank runs the same count)."""
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


def grad_norm_value(norm: torch.Tensor | None) -> torch.Tensor | None:
    """The clipping norm of DTensor gradients as a plain tensor (the same on every rank)."""
    return None if norm is None else full_tensor(norm)

