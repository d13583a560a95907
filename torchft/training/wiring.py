"""From a config's values to a running training loop: the setup every fine-tuning recipe shares.

A recipe (SFT, DPO, KD; on one device or many) reads its own config and hands these functions plain
values; what differs between recipes (the model builder, the loss, the train step) stays in the
recipe, which still reads top to bottom::

    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed)
    model = build_model(partial(instantiate, cfg.model), checkpointer, run, trainable="adapters", ...)
    # (build_sharded_model on many devices)
    loader, val_loader = build_loaders(dataset, val_dataset, batch_size, run, seed=cfg.seed, pad_id=...)
    optimizer, lr_scheduler = ...                                           # the recipe's components
    step = resume_sharded(run, model, optimizer, lr_scheduler, loader, ...)  # 0 for a fresh run
    loop = make_loop(run, total_steps, save, metric_logger, start_step=step, validate=..., **cadences)
    start_writing(...)                                                       # every start check passed
    train(loop, model, loader, train_step, optimizer, metric_logger)

``cadences`` are the config's ``LOOP_KEYS`` (``{k: cfg[k] for k in LOOP_KEYS if k in cfg}``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger("torchft")

# The top-level config keys the training loop takes as they are (``TrainingLoop``'s keyword arguments).
LOOP_KEYS = ("gradient_accumulation_steps", "save_every_n_steps", "log_every_n_steps", "eval_every_n_steps",
             "progress_bar")


@dataclass
class Run:
    """Where this process trains and what it continues: ``device`` and ``dtype``; ``resume_dir`` and
    its ``resumed`` training state (None for a fresh run); ``env``, the process's place in a torchrun
    job (None on one device)."""

    output_dir: Path
    device: torch.device
    dtype: torch.dtype
    resume_dir: Path | None = None
    resumed: dict | None = None
    env: object = None  # torchft.training.distributed.DistributedEnv

    @property
    def is_main_process(self) -> bool:
        return self.env is None or self.env.is_main_process

    @property
    def rank(self) -> int:
        return 0 if self.env is None else self.env.rank

    @property
    def world_size(self) -> int:
        return 1 if self.env is None else self.env.world_size


def start_run(output_dir, resume_from_checkpoint, device: str, dtype: str, *, seed: int,
              cpu_threads: int | None = None, env=None) -> Run:
    """Resolve the device (``env``'s under torchrun) and dtype, set the CPU threads and every seed (the
    same on every rank: the same fresh adapters and dropout masks everywhere), and find the folder
    ``resume_from_checkpoint`` names (``latest``, a path, or None) with its training state."""
    from torchft.checkpoint import load_training_state, resolve_resume_dir
    from torchft.training.precision import resolve_device, resolve_dtype
    from torchft.training.rng import seed_everything

    resolved = env.device if env is not None else resolve_device(device)
    if cpu_threads:  # intra-op threads of CPU runs (a tiny model is fastest on one)
        torch.set_num_threads(cpu_threads)
    seed_everything(seed)
    output_dir = Path(output_dir)
    resume_dir = resolve_resume_dir(resume_from_checkpoint, output_dir)
    resumed = load_training_state(resume_dir) if resume_dir is not None else None
    return Run(output_dir, resolved, resolve_dtype(dtype, resolved), resume_dir, resumed, env)


def run_length(run: Run, max_steps: int | None, epochs: float | None, batches_per_epoch: int,
               gradient_accumulation_steps: int) -> int:
    """The run's last step (``max_steps``, ``epochs`` worth, or the smaller); a resumed run whose step is
    already past it is refused here, before anything (the metric logs included) is written."""
    from torchft.training.steps import check_resume_step, total_training_steps

    total = total_training_steps(max_steps, epochs, batches_per_epoch, gradient_accumulation_steps)
    if run.resumed is not None:
        check_resume_step(int(run.resumed["step"]), total)
    return total


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def log_model(model: nn.Module, run: Run) -> None:
    """One line: the architecture, trainable and total parameters (and the ranks and this rank's bytes)."""
    from torchft.training.setup import model_args_summary

    if not run.is_main_process:
        return
    line = (f"model: {model_args_summary(model.args)}; {sum(p.numel() for p in trainable_params(model)) / 1e6:.2f}M "
            f"trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    if run.env is not None:
        from torchft.training.distributed import local_bytes

        line += f"; {run.world_size} ranks, {local_bytes(model) / 2**20:.1f} MiB of weights on rank 0"
    log.info("%s", line)


def builds_adapters(model_node: Mapping) -> bool:
    """Whether a config's ``model`` node builds LoRA/DoRA adapters: a ``lora_*`` / ``qlora_*`` builder, or
    any builder (``from_hf_config``) given LoRA targets (``lora_attn_modules``, ``apply_lora_to_mlp``,
    ``apply_lora_to_output``). Read from the node, before its checkpoint needs to exist."""
    builder = str(model_node.get("_component_", "")).rsplit(".", 1)[-1]
    targets = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output")
    return builder.startswith(("lora_", "qlora_")) or any(bool(model_node.get(key)) for key in targets)


def build_model(build: Callable[[], nn.Module], checkpointer, run: Run, *,
                trainable: Literal["all", "adapters", "none"], activation_checkpointing: bool = False,
                compile: bool = False, tiled_mlp_tokens: int | None = None, qat=None) -> nn.Module:
    """Build a model on ``meta`` with ``build()`` (in ``run.dtype``), check it against the checkpoint,
    load it on ``run.device`` one layer at a time, then apply the tiled MLP, activation checkpointing
    and compile (see :func:`apply_activation_settings`).

    ``trainable``: ``all`` (full fine-tuning; a resumed run continues from its step folder's weights),
    ``adapters`` (LoRA/DoRA/QLoRA on ``checkpointer``'s base weights; a resumed run's adapters, else
    fresh ones) or ``none`` (a frozen reference or teacher model, from ``checkpointer``'s weights).
    ``qat`` (:class:`~torchft.training.qat.QATSettings`) fake-quantizes the linears after the load.
    """
    from torchft.training.setup import check_same_architecture, default_dtype, load_adapter_model, load_full_model

    with torch.device("meta"), default_dtype(run.dtype):
        model = build()
    check_same_architecture(model.args, checkpointer.model_args, checkpointer.checkpoint_dir)
    if trainable == "adapters":
        adapters = run.resumed["adapter"] if run.resumed is not None else None
        load_adapter_model(model, checkpointer.load_model_state_dict(), run.device, run.dtype,
                           adapter_state_dict=adapters)
    else:
        weights_from = run.resume_dir if trainable == "all" else None
        load_full_model(model, checkpointer.load_model_state_dict(weights_from), run.device, run.dtype)
        if trainable == "none":
            model.requires_grad_(False)
    apply_activation_settings(model, tiled_mlp_tokens, activation_checkpointing, compile, qat=qat)
    return model


def apply_activation_settings(model: nn.Module, tiled_mlp_tokens: int | None, activation_checkpointing: bool,
                              compile: bool, qat=None) -> None:
    """The config's ``qat`` (fake-quantized linears), ``tiled_mlp_tokens`` (the MLP in sequence tiles of
    that many tokens; None: whole), ``enable_activation_checkpointing`` and ``compile``, in that order,
    on one device as on many."""
    from torchft.training.activations import apply_activation_checkpointing, apply_tiled_mlp
    from torchft.training.compile import compile_layers

    if qat is not None:
        from torchft.training.qat import apply_qat

        apply_qat(model, qat)
    if tiled_mlp_tokens is not None:
        apply_tiled_mlp(model, int(tiled_mlp_tokens))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_layers(model)


def build_sharded_model(build: Callable[[], nn.Module], checkpointer, run: Run, *,
                        trainable: Literal["all", "adapters", "none"], activation_checkpointing: bool = False,
                        compile: bool = False, fp32_reduce: bool = False, cpu_offload: bool = False,
                        tiled_mlp_tokens: int | None = None, qat=None) -> nn.Module:
    """Build a model on ``meta`` with ``build()`` (in ``run.dtype``), check it against the checkpoint,
    apply the tiled MLP, activation checkpointing, compile and FSDP2 (in that order), stream in this rank's rows of
    ``checkpointer``'s weights and leave ``trainable`` parameters trainable: ``all`` (full fine-tuning),
    ``adapters`` (LoRA/DoRA/QLoRA, fresh adapters the same on every rank) or ``none`` (a frozen
    reference or teacher model). ``fp32_reduce`` reduces gradients in fp32; ``cpu_offload`` keeps
    the shards, gradients and optimizer state in CPU memory. ``qat`` (:class:`~torchft.training.qat.QATSettings`)
    fake-quantizes the linears before all of these.
    """
    from torchft.modules.peft import get_adapter_params, set_trainable_params
    from torchft.training.distributed import (check_cpu_offload, check_loaded, check_nf4_shardable,
                                              load_sharded_weights, shard_model)
    from torchft.training.setup import check_same_architecture, default_dtype

    env = run.env
    check_cpu_offload(cpu_offload, env.device)
    with torch.device("meta"), default_dtype(run.dtype):
        model = build()
    check_same_architecture(model.args, checkpointer.model_args, checkpointer.checkpoint_dir)
    check_nf4_shardable(model, env.shard_count)
    apply_activation_settings(model, tiled_mlp_tokens, activation_checkpointing, compile, qat=qat)
    # Weights are stored in ``dtype`` and computed in it; gradients optionally reduced in fp32.
    shard_model(model, env.mesh, reduce_dtype=torch.float32 if fp32_reduce else None, cpu_offload=cpu_offload)
    load_sharded_weights(model, checkpointer.load_model_state_dict(), env.device, run.dtype,
                         fresh_adapters=trainable == "adapters")
    check_loaded(model)
    if trainable == "adapters":
        set_trainable_params(model, get_adapter_params(model))
    elif trainable == "none":
        model.requires_grad_(False)
    return model


def check_offload_memory(model: nn.Module, run: Run, batch_size: int, seq_len: int | None, *, enabled: bool) -> None:
    """Before the first step, when ``enable_activation_offloading``: refused off CUDA, and refused in one
    line naming the host RAM needed and available when this machine's ranks (``batch_size`` samples
    of ``seq_len`` tokens per rank) would not fit (:func:`~torchft.training.activations.check_offload_host_memory`)."""
    import os

    from torchft.training.activations import check_offload_host_memory

    ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if run.env is not None else 1
    check_offload_host_memory(enabled, run.device, num_layers=model.args.num_layers, batch_size=batch_size,
                              seq_len=seq_len, dim=model.args.embed_dim, dtype=run.dtype, ranks_on_host=ranks_on_host)


def run_identity_checked(recipe: str, model: nn.Module, run: Run) -> dict:
    """The run's identity (recipe, architecture, adapters), saved with each step folder; a resumed run
    must have the identity of the one it continues."""
    from torchft.training.distributed_checkpoint import check_same_run, run_identity

    identity = run_identity(recipe, model)
    if run.resumed is not None:
        check_same_run(run.resumed.get("run"), identity, run.resume_dir)
    return identity


def build_loaders(dataset, validation_dataset, batch_size: int, run: Run, *, seed: int, pad_id: int,
                  shuffle: bool = True, collate_fn=None):
    """The training loader (this rank's share of ``batch_size`` per rank, shuffled from ``seed``)
    and the validation loader (every sample once over all ranks; None without a dataset)."""
    from torchft.data.dataloader import build_dataloader

    place = dict(rank=run.rank, world_size=run.world_size, pad_id=pad_id, device=run.device, collate_fn=collate_fn)
    loader = build_dataloader(dataset, batch_size, shuffle=shuffle, seed=seed, **place)
    val_loader = None
    if validation_dataset is not None:
        val_loader = build_dataloader(validation_dataset, batch_size, shuffle=False, drop_last=False, **place)
    return loader, val_loader


def resume_sharded(run: Run, model: nn.Module, optimizer, lr_scheduler, loader, *, adapters_only: bool,
                   global_batch_size: int) -> int:
    """A resumed sharded run's trainable weights and optimizer from its DCP shards (resharded to this
    world size), then its LR schedule, data position and RNG; returns the step to continue after (0
    for a fresh run)."""
    from torchft.training.distributed_checkpoint import DCP_DIR, load_trainable_state, restore_recipe_state

    if run.resumed is None:
        return 0
    load_trainable_state(model, optimizer, run.resume_dir / DCP_DIR, adapters_only=adapters_only)
    step = restore_recipe_state(run.resumed, lr_scheduler, loader, global_batch_size)
    if run.is_main_process:
        log.info("resumed from %s at step %d", run.resume_dir, step)
    return step


def sharded_save(run: Run, checkpointer, model: nn.Module, optimizer, lr_scheduler, loader, identity: Mapping, *,
                 adapters_only: bool, global_batch_size: int, async_save: bool = False) -> Callable[[int], str]:
    """``save(step) -> str`` for the loop: every rank writes ``step_<N>/`` (see ``save_sharded_step``).

    ``async_save`` (the config's): the DCP shards are written in the background and ``save.finish()``
    waits for the last save and renames its folder into place (:class:`~torchft.training.distributed_checkpoint.
    BackgroundSaves`); :func:`make_loop` hands it to the loop, which calls it before the run ends.
    """
    from torchft.training.distributed_checkpoint import BackgroundSaves, recipe_state, save_sharded_step

    background = BackgroundSaves(run.env.timeout) if async_save else None

    def save(step: int) -> str:
        state = recipe_state(step, lr_scheduler, loader, identity, global_batch_size)
        return str(save_sharded_step(step, checkpointer, model, optimizer, state, adapters_only=adapters_only,
                                     is_main=run.is_main_process, background=background))

    if background is not None:
        save.finish = background.finish
    return save


def resume_and_save(run: Run, checkpointer, model: nn.Module, optimizer, lr_scheduler, loader, *, adapters: bool,
                    identity: Mapping | None = None, global_batch_size: int | None = None,
                    async_save: bool = False) -> tuple[int, Callable[[int], str]]:
    """``(step, save)``: a resumed run's optimizer, LR schedule, data position and RNG put back (the step to
    continue after; 0 for a fresh run), and ``save(step) -> str`` for the loop.

    On one device ``save`` writes ``step_<N>/`` with the model as an HF folder (the merged model and
    ``adapter/`` with ``adapters``) and ``training_state.pt``; under torchrun it is :func:`sharded_save`
    (``identity``, ``global_batch_size``, ``async_save``) after :func:`resume_sharded`."""
    from torchft.training.checkpointing import adapter_state_dict_cpu, cpu_state_dict
    from torchft.training.state import restore_training_state, training_state

    if run.env is not None:
        step = resume_sharded(run, model, optimizer, lr_scheduler, loader, adapters_only=adapters,
                              global_batch_size=global_batch_size)
        return step, sharded_save(run, checkpointer, model, optimizer, lr_scheduler, loader, identity,
                                  adapters_only=adapters, global_batch_size=global_batch_size,
                                  async_save=async_save)
    step = 0
    if run.resumed is not None:
        step = restore_training_state(run.resumed, optimizer, lr_scheduler, loader)
        log.info("resumed from %s at step %d", run.resume_dir, step)

    def save(step: int) -> str:
        if adapters:  # the merged HF folder + step_<N>/adapter/
            state = training_state(step, optimizer, lr_scheduler, loader, adapter_state_dict_cpu(model))
            return str(checkpointer.save(step, model, adapter_model=model, training_state=state))
        state = training_state(step, optimizer, lr_scheduler, loader)
        return str(checkpointer.save(step, cpu_state_dict(model), training_state=state))

    return step, save


def sft_train_step(model: nn.Module, loss_fn, optimizer, lr_scheduler, run: Run, *,
                   max_grad_norm: float | None = None, offload_activations: bool = False):
    """``train_step(micro_batches, step)`` of the supervised recipes: token-weighted cross-entropy over the
    micro-batches, then the update (the sharded step under torchrun, with global values)."""
    from torchft.training.distributed_steps import sharded_optimizer_step
    from torchft.training.steps import optimizer_step

    step_fn = optimizer_step if run.env is None else sharded_optimizer_step
    return lambda micro_batches, step: step_fn(model, micro_batches, loss_fn, optimizer, lr_scheduler,
                                               max_grad_norm=max_grad_norm, offload_activations=offload_activations)


def sft_validation(model: nn.Module, val_loader, loss_fn, run: Run) -> Callable[[], float] | None:
    """``validate()`` for the loop: the token-weighted loss over every validation sample (over all ranks
    under torchrun), or None without a validation loader."""
    from torchft.training.distributed_steps import sharded_validation_loss
    from torchft.training.steps import validation_loss

    if val_loader is None:
        return None
    return partial(validation_loss if run.env is None else sharded_validation_loss, model, val_loader, loss_fn,
                   run.device)


def make_loop(run: Run, total_steps: int, save: Callable[[int], str], metric_logger, *, start_step: int,
              validate: Callable[[], float] | None = None, flops_per_token: Callable[[int], float] | None = None,
              **cadences):
    """The :class:`~torchft.training.loop.TrainingLoop` of ``run``: its device, the folder it resumed
    from, under torchrun the main process and the stop decision taken on every rank together, and the
    ``finish`` of a ``save`` that completes in the background (:func:`sharded_save`).
    ``cadences``: the config's ``LOOP_KEYS``."""
    from torchft.training.loop import TrainingLoop

    ranks = {}
    if run.env is not None:
        from torchft.training.distributed import any_rank

        ranks = dict(is_main_process=run.is_main_process, any_rank=partial(any_rank, group=run.env.cpu_group))
    return TrainingLoop(total_steps, save, metric_logger, run.device, start_step=start_step, validate=validate,
                        flops_per_token=flops_per_token, last_checkpoint=run.resume_dir,
                        finish_save=getattr(save, "finish", None), **ranks, **cadences)


def train(loop, model: nn.Module, loader, train_step, optimizer, metric_logger) -> None:
    """Run ``loop`` over ``loader`` to its last step (a stop request saves, then exits), then close the logger."""
    model.train()
    loop.run(loader, train_step, lr=lambda: float(optimizer.param_groups[0]["lr"]))
    metric_logger.close()
