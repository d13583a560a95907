"""The train step and validation of preference tuning (DPO, IPO, SimPO), shared by the DPO recipes.

A micro-batch holds ``b`` pairs as ``2b`` rows, chosen answers first (``preference_collate``). The
policy's log-probabilities come from one forward of the ``2b`` rows; the reference's from ``reference(batch)``
without gradients: for LoRA the same model with its adapters disabled (:func:`adapters_disabled_reference`:
no second copy of the weights), for full fine-tuning a frozen copy (:func:`frozen_reference`).

The loss is pair-weighted: every micro-batch's summed per-pair loss is divided by the pairs of the whole
optimizer step, so gradient accumulation never changes the result. The step logs TRL's metric names:
``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins`` (means
over the step's pairs).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from torchft.modules.loss import shift_targets
from torchft.modules.peft import disable_adapter
from torchft.modules.preference import METRIC_NAMES, PreferenceLoss, preference_metrics
from torchft.training.activations import activation_offloading
from torchft.training.steps import StepResult, accumulate_gradients, step_tokens, to_device, update_weights

Reference = Callable[[dict], torch.Tensor]  # batch -> [2b] the reference's log-probabilities


def _hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    return model.hidden_states(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))


@torch.no_grad()
def frozen_reference(reference_model: nn.Module, loss_fn: PreferenceLoss, batch: dict) -> torch.Tensor:
    """[2b] log-probabilities of the batch's answers under a frozen reference model."""
    targets = shift_targets(batch["labels"], loss_fn.ignore_index)
    return loss_fn.log_probs(_hidden(reference_model, batch), targets, reference_model.output)[0]


def adapters_disabled_reference(model: nn.Module, loss_fn: PreferenceLoss) -> Reference:
    """The reference of LoRA preference tuning: the policy with its adapters disabled (its base model)."""

    def reference(batch: dict) -> torch.Tensor:
        with disable_adapter(model):
            return frozen_reference(model, loss_fn, batch)

    return reference


def preference_loss_sum(model: nn.Module, batch: dict, loss_fn: PreferenceLoss, reference: Reference | None,
                        metric_sums: torch.Tensor, offload_activations: bool = False) -> torch.Tensor:
    """[] the summed per-pair loss of one micro-batch (graph attached); adds the batch's metric sums
    (:func:`~torchft.modules.preference.preference_metrics`) into ``metric_sums`` [5]."""
    ref = reference(batch) if loss_fn.needs_reference else None  # [2b], no graph
    targets = shift_targets(batch["labels"], loss_fn.ignore_index)  # [2b, s]
    with activation_offloading(offload_activations, batch["tokens"].device):
        hidden = _hidden(model, batch)
    policy, lengths = loss_fn.log_probs(hidden, targets, model.output)  # [2b], [2b]
    losses, chosen_rewards, rejected_rewards = loss_fn(policy, lengths, ref)
    # a pair whose answers carry no target (a rank's masked tail copy) counts nothing, as in num_pairs
    b = losses.shape[0]
    real = (lengths[:b] > 0) & (lengths[b:] > 0)  # [b]
    losses, chosen_rewards, rejected_rewards = (torch.where(real, x, torch.zeros_like(x))
                                                for x in (losses, chosen_rewards, rejected_rewards))
    metric_sums += preference_metrics(losses, chosen_rewards, rejected_rewards)
    return losses.sum()


def _step_pairs(micro_batches: Sequence[dict]) -> int:
    return sum(b["num_pairs"] if "num_pairs" in b else b["tokens"].shape[0] // 2 for b in micro_batches)


def preference_step(model: nn.Module, micro_batches: Sequence[dict], loss_fn: PreferenceLoss, optimizer,
                    lr_scheduler, *, reference: Reference | None, max_grad_norm: float | None = None,
                    offload_activations: bool = False, sharded: bool = False) -> StepResult:
    """One optimizer step of preference tuning: pair-weighted forward/backward, then the shared update
    (clip, skip a non-finite step on the device, LR schedule). Returns the step's means as metrics.

    ``sharded`` (a data-parallel run): the loss is divided by the pairs of the step over all ranks and the
    metrics, counts and gradient norm are global, so N ranks train as one device with every rank's pairs."""
    from torchft.training.distributed import all_reduce_sum, full_tensor
    from torchft.training.distributed_steps import sharded_accumulate_gradients

    device = micro_batches[0]["tokens"].device
    reduce = all_reduce_sum if sharded else (lambda t: t)
    pairs = reduce(torch.tensor(_step_pairs(micro_batches), dtype=torch.float32, device=device))  # [] global
    sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float32, device=device)
    batch_loss = partial(preference_loss_sum, model, loss_fn=loss_fn, reference=reference, metric_sums=sums,
                         offload_activations=offload_activations)
    if sharded:
        sharded_accumulate_gradients(model, micro_batches, batch_loss, pairs)
    else:
        accumulate_gradients(micro_batches, batch_loss, pairs.clamp(min=1))
    means = reduce(sums) / pairs.clamp(min=1)
    grad_norm, found_inf = update_weights(optimizer, lr_scheduler, means[0], max_grad_norm,
                                          global_norm=full_tensor if sharded else (lambda norm: norm))
    counts = reduce(torch.tensor([sum(int(b["num_target_tokens"]) for b in micro_batches),
                                  step_tokens(micro_batches)], device=device))  # [answer tokens, tokens]
    return StepResult(means[0], counts[0], grad_norm, found_inf, counts[1],
                      metrics=dict(zip(METRIC_NAMES[1:], means[1:])))


@torch.no_grad()
def preference_validation(model: nn.Module, batches, loss_fn: PreferenceLoss, reference: Reference | None,
                          device: torch.device) -> dict[str, float]:
    """The metrics of :func:`preference_step` over every validation pair (over all ranks under torchrun:
    every rank runs the same count of batches, a tail padded with masked pairs that count nothing), in eval
    mode (``{"loss": ..., "rewards/accuracies": ...}``; the loop logs them as ``val_<name>``)."""
    from torchft.training.distributed import all_reduce_sum

    was_training = model.training
    model.eval()
    sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float32, device=device)
    pairs = 0
    try:
        for batch in batches:
            batch = to_device(batch, device)
            preference_loss_sum(model, batch, loss_fn, reference, sums)
            pairs += _step_pairs([batch])
    finally:
        model.train(was_training)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([pairs], dtype=torch.float32, device=device)]))
    return {name: float(value) for name, value in zip(METRIC_NAMES, totals[:-1] / totals[-1].clamp(min=1))}


def preference_train_step(model: nn.Module, loss_fn: PreferenceLoss, optimizer, lr_scheduler,
                          reference: Reference | None, *, sharded: bool, max_grad_norm: float | None = None,
                          offload_activations: bool = False):
    """``train_step(micro_batches, step)`` of the preference recipes: :func:`preference_step` (with global
    values when ``sharded``, a run under torchrun)."""
    return lambda micro_batches, step: preference_step(
        model, micro_batches, loss_fn, optimizer, lr_scheduler, reference=reference, max_grad_norm=max_grad_norm,
        offload_activations=offload_activations, sharded=sharded)


def preference_validate(model: nn.Module, val_loader, loss_fn: PreferenceLoss, reference: Reference | None,
                        device: torch.device):
    """``validate()`` for the loop: :func:`preference_validation` over ``val_loader``, or None without one."""
    return None if val_loader is None else partial(preference_validation, model, val_loader, loss_fn, reference,
                                                   device)


@torch.no_grad()
def precompute_reference(reference: Reference, loader, device: torch.device, *, rank: int = 0,
                         world_size: int = 1) -> Reference:
    """The reference as a table: every pair of ``loader``'s dataset run once through ``reference`` (in
    batches of ``loader.batch_size`` pairs, in dataset order, shared over the ranks), its chosen and rejected
    log-probabilities kept by the pair's ``index``. The returned reference looks a batch's pairs up, so the
    reference model is no longer needed once the tables of the train and validation sets exist."""
    from torchft.training.distributed import all_reduce_sum

    dataset = loader.dataset
    real = [i for i in range(len(dataset)) if dataset[i]["index"] == i]  # not a rank's masked tail copy
    table = torch.zeros(len(real), 2, dtype=torch.float32, device=device)  # [n, (chosen, rejected)]
    batches = [real[k:k + loader.batch_size] for k in range(0, len(real), loader.batch_size)]
    rounds = -(-len(batches) // world_size)  # every rank runs as many forwards (FSDP gathers together)
    for r in range(rounds):
        k = r * world_size + rank
        indices = batches[k] if k < len(batches) else batches[0]  # a rank short of batches repeats the first
        batch = to_device(loader.collate_fn([dataset[i] for i in indices]), device)
        log_probs = reference(batch).float()  # [2b]
        if k < len(batches):
            table[indices] = torch.stack(log_probs.chunk(2), dim=1)  # [b, 2]
    if world_size > 1:  # each row was filled by one rank
        table = all_reduce_sum(table)

    def lookup(batch: dict) -> torch.Tensor:
        pairs = table[batch["index"].to(table.device)]  # [b, 2]
        return torch.cat([pairs[:, 0], pairs[:, 1]])  # [2b], chosen first as the batch's rows
    return lookup
