"""The setup the preference recipes share (``lora_dpo_*`` and ``full_dpo_*``, on one device or many).

A recipe reads its own config and hands these functions plain values, one call per section
(``resume_and_save`` is in :mod:`torchft.training.wiring`, shared with any recipe)::

    model, reference = build_preference_models(build, checkpointer, run, loss_fn, adapters=..., ...)
    loader, val_loader, total_steps = preference_loaders(tokenizer, make_dataset, make_val_dataset, ...)
    reference, val_reference = training_references(reference, loader, val_loader, run, mode=...)
    step, save = resume_and_save(run, checkpointer, model, optimizer, lr_scheduler, loader, adapters=...)
    loop, train_step = preference_loop(run, model, loss_fn, reference, val_reference, optimizer, ...)

Where the run trains (``run.env``: one device, or sharded under torchrun) and what trains (``adapters``:
LoRA/DoRA/QLoRA adapters on a frozen base, or every weight; :func:`~torchft.training.wiring.builds_adapters`
reads it from the model builder) are the only choices; everything else is the same code for all four.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from torchft.modules.preference import PreferenceLoss
from torchft.training.preference import (Reference, adapters_disabled_reference, frozen_reference,
                                         precompute_reference, preference_train_step, preference_validate)
from torchft.training.wiring import (Run, build_loaders, build_model, build_sharded_model, log_model, make_loop,
                                     run_length)


def build_preference_models(build: Callable[[], nn.Module], checkpointer, run: Run, loss_fn: PreferenceLoss, *,
                            adapters: bool, activation_checkpointing: bool = False, compile: bool = False,
                            fp32_reduce: bool = False, cpu_offload: bool = False) -> tuple[nn.Module, Reference | None]:
    """The policy ``build()`` makes, loaded from ``checkpointer`` (sharded per decoder layer under torchrun),
    and the reference its loss compares it with (None for SimPO, which needs none).

    With ``adapters`` the reference is the policy with its adapters disabled: the base weights, no second
    copy. Without, it is a frozen copy of the input model (sharded like the policy), loaded once beside the
    policy: always the input model, also when the policy resumes from a later step. ``fp32_reduce`` and
    ``cpu_offload`` apply under torchrun only (see :func:`~torchft.training.wiring.build_sharded_model`).
    """
    trainable = "adapters" if adapters else "all"
    if run.env is None:
        model = build_model(build, checkpointer, run, trainable=trainable,
                            activation_checkpointing=activation_checkpointing, compile=compile)
    else:
        model = build_sharded_model(build, checkpointer, run, trainable=trainable,
                                    activation_checkpointing=activation_checkpointing, compile=compile,
                                    fp32_reduce=fp32_reduce, cpu_offload=cpu_offload)
    log_model(model, run)
    if not loss_fn.needs_reference:
        return model, None
    if adapters:
        return model, adapters_disabled_reference(model, loss_fn)
    if run.env is None:
        frozen = build_model(build, checkpointer, run, trainable="none", compile=compile)
    else:
        frozen = build_sharded_model(build, checkpointer, run, trainable="none", compile=compile,
                                     cpu_offload=cpu_offload)
    return model, partial(frozen_reference, frozen, loss_fn)


def preference_loaders(tokenizer, make_dataset: Callable, make_validation_dataset: Callable | None, batch_size: int,
                       run: Run, *, vocab_size: int, tokenizer_path: str | None, seed: int, shuffle: bool,
                       max_steps: int | None, epochs: float | None, gradient_accumulation_steps: int):
    """``(loader, val_loader, total_steps)``: the pairs ``make_dataset(tokenizer=tokenizer)`` reads
    (``batch_size`` pairs per rank, chosen and rejected collated into one batch of ``2 * batch_size`` rows),
    the validation pairs (None without ``make_validation_dataset``), and the run's last step (a resume past it
    is refused here). The tokenizer must fit the model's ``vocab_size``: checked before any pair is read."""
    from torchft.data.preference import preference_collate
    from torchft.training.setup import check_tokenizer_fits

    check_tokenizer_fits(tokenizer.vocab_size, vocab_size, tokenizer_path)
    dataset = make_dataset(tokenizer=tokenizer)
    validation_dataset = None if make_validation_dataset is None else make_validation_dataset(tokenizer=tokenizer)
    loader, val_loader = build_loaders(dataset, validation_dataset, batch_size, run, seed=seed,
                                       pad_id=tokenizer.pad_id, shuffle=shuffle,
                                       collate_fn=partial(preference_collate, pad_id=tokenizer.pad_id))
    return loader, val_loader, run_length(run, max_steps, epochs, len(loader), gradient_accumulation_steps)


def training_references(reference: Reference | None, loader, val_loader, run: Run, *,
                        mode: str = "model") -> tuple[Reference | None, Reference | None]:
    """``(reference, val_reference)``: with ``mode`` ``model`` (the config's ``reference``), ``reference``
    for both; with ``precomputed``, tables of every train and validation pair's reference log-probabilities,
    computed once before the first step (:func:`~torchft.training.preference.precompute_reference`). The
    reference model is then dropped: a full run's frozen copy is freed once the caller lets go of
    ``reference``, and no step runs a reference forward. A resumed run computes the tables again from the
    same input model, so it continues exactly."""
    if mode not in ("model", "precomputed"):
        raise ValueError(f"reference ({mode}) must be 'model' (the reference model runs on every batch) or "
                         "'precomputed' (its log-probs computed once before training)")
    if mode == "model" or reference is None:
        return reference, reference
    place = dict(rank=run.rank, world_size=run.world_size)
    tables = [None if data is None else precompute_reference(reference, data, run.device, **place)
              for data in (loader, val_loader)]
    return tables[0], tables[1]


def preference_loop(run: Run, model: nn.Module, loss_fn: PreferenceLoss, reference: Reference | None,
                    val_reference: Reference | None, optimizer, lr_scheduler, save: Callable[[int], str],
                    metric_logger, val_loader, *, total_steps: int,
                    start_step: int, adapters: bool, max_grad_norm: float | None = None,
                    offload_activations: bool = False, **cadences):
    """``(loop, train_step)``: the shared :class:`~torchft.training.loop.TrainingLoop` (``cadences``: the
    config's ``LOOP_KEYS``) validating on ``val_loader`` against ``val_reference`` (TRL's metric names,
    ``val_``-prefixed), and the pair-weighted preference step (global over all ranks under torchrun)."""
    from torchft.training.throughput import model_flops_per_token

    train_step = preference_train_step(model, loss_fn, optimizer, lr_scheduler, reference, sharded=run.env is not None,
                                       max_grad_norm=max_grad_norm, offload_activations=offload_activations)
    loop = make_loop(run, total_steps, save, metric_logger, start_step=start_step,
                     validate=preference_validate(model, val_loader, loss_fn, val_reference, run.device),
                     flops_per_token=partial(model_flops_per_token, model.args, full_finetune=not adapters),
                     **cadences)
    return loop, train_step
