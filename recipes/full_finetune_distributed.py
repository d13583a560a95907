"""Full fine-tuning of a Llama model on many devices (FSDP2), launched by torchrun: every weight trains.

    tune run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full
    tune run --nproc_per_node 2 full_finetune_distributed --config quickstart/full_distributed   (CPU, gloo)

``batch_size`` is the global micro-batch (all ranks together): N ranks with batch_size B train exactly
as one device with B. The model is sharded per decoder layer and streamed in, each rank reading only
its rows; weights, gradients and AdamW state stay sharded. Every save writes the same
``<output_dir>/step_<N>/`` HF folder as the single-device recipe plus ``distributed/`` (DCP: model +
optimizer) for ``resume_from_checkpoint``, at this or another world size. The file reads top to
bottom: setup, loop, save.
"""
import logging
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from torchft.checkpoint import load_training_state, resolve_resume_dir
from torchft.config import check_start, instantiate, recipe_main
from torchft.data.dataloader import build_dataloader
from torchft.training.activations import apply_activation_checkpointing
from torchft.training.compile import compile_layers
from torchft.training.distributed import (any_rank, check_loaded,
                                          init_distributed, load_sharded_weights, local_bytes, per_rank_batch_size,
                                          shard_model)
from torchft.training.distributed_steps import sharded_optimizer_step, sharded_validation_loss
from torchft.training.distributed_checkpoint import (DCP_DIR, check_same_run, load_trainable_state, recipe_state,
                                                     restore_recipe_state, run_identity, save_sharded_step)
from torchft.training.loop import TrainingLoop
from torchft.training.metric_logging import MetricLogger
from torchft.training.precision import resolve_dtype
from torchft.training.rng import seed_everything
from torchft.training.setup import (check_same_architecture, check_tokenizer_fits, default_dtype, model_args_summary,
                                    start_writing)
from torchft.training.steps import check_resume_step, StepResult, total_training_steps
from torchft.training.throughput import model_flops_per_token

log = logging.getLogger("torchft")
RECIPE = "full_finetune_distributed"


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    env = init_distributed(cfg.device, timeout_minutes=cfg.get("timeout_minutes", 10),
                           replicas=cfg.get("replicas", 1), recipe=RECIPE)
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    local_batch = per_rank_batch_size(cfg.batch_size, env.world_size)
    output_dir = Path(cfg.output_dir)
    dtype = resolve_dtype(cfg.dtype, env.device)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)  # the same seed on every rank: the same dropout masks everywhere

    # ------------------------------------------------------------------ setup: model
    resume_dir = resolve_resume_dir(cfg.get("resume_from_checkpoint"), output_dir)
    resumed = load_training_state(resume_dir) if resume_dir is not None else None
    if env.is_main_process and cfg.get("base_model") is not None:  # the quickstart's tiny base model
        instantiate(cfg.base_model)
    dist.barrier()
    checkpointer = instantiate(cfg.checkpointer)

    with torch.device("meta"), default_dtype(dtype):
        model = instantiate(cfg.model)
    check_same_architecture(model.args, checkpointer.model_args, cfg.checkpointer.checkpoint_dir)
    run = run_identity(RECIPE, model)
    if resumed is not None:
        check_same_run(resumed.get("run"), run, resume_dir)
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_layers(model)
    # Weights are stored in ``dtype`` and computed in it; gradients optionally reduced in fp32.
    shard_model(model, env.mesh, reduce_dtype=torch.float32 if cfg.get("fp32_reduce", False) else None,
                cpu_offload=cfg.get("cpu_offload", False))
    # A resumed run then overwrites every weight from its DCP shards.
    load_sharded_weights(model, checkpointer.load_model_state_dict(), env.device, dtype)
    check_loaded(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if env.is_main_process:
        log.info("model: %s; %.2fM trainable of %.2fM parameters; %d ranks, %.1f MiB of weights on rank 0",
                 model_args_summary(model.args), sum(p.numel() for p in trainable) / 1e6,
                 sum(p.numel() for p in model.parameters()) / 1e6, env.world_size, local_bytes(model) / 2**20)

    # ------------------------------------------------------------------ setup: data (each rank its share)
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer.vocab_size, model.args.vocab_size, cfg.tokenizer.get("path"))
    ranks = dict(rank=env.rank, world_size=env.world_size, pad_id=tokenizer.pad_id, device=env.device)
    loader = build_dataloader(instantiate(cfg.dataset, tokenizer=tokenizer), local_batch,
                              shuffle=cfg.get("shuffle", True), seed=cfg.seed, **ranks)
    val_loader = None
    if cfg.get("validation_dataset") is not None:
        val_loader = build_dataloader(instantiate(cfg.validation_dataset, tokenizer=tokenizer), local_batch,
                                      shuffle=False, drop_last=False, **ranks)
    accum = cfg.gradient_accumulation_steps
    total_steps = total_training_steps(cfg.get("max_steps"), cfg.get("epochs"), len(loader), accum)

    # ------------------------------------------------------------------ setup: optimization and logging
    optimizer = instantiate(cfg.optimizer, trainable)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = instantiate(cfg.loss, compile=cfg.compile)
    step = 0
    if resumed is not None:  # weights and optimizer from the DCP shards, resharded to this world size
        load_trainable_state(model, optimizer, resume_dir / DCP_DIR, adapters_only=False)
        step = restore_recipe_state(resumed, lr_scheduler, loader, cfg.batch_size)
        check_resume_step(step, total_steps)  # a finished run refuses, saying how to go on
        if env.is_main_process:
            log.info("resumed from %s at step %d", resume_dir, step)

    def save(step: int) -> str:
        state = recipe_state(step, lr_scheduler, loader, run, cfg.batch_size)
        return str(save_sharded_step(step, checkpointer, model, optimizer, state, adapters_only=False,
                                     is_main=env.is_main_process))

    # ------------------------------------------------------------------ loop
    def train_step(micro_batches: list[dict], step: int) -> StepResult:
        return sharded_optimizer_step(model, micro_batches, loss_fn, optimizer, lr_scheduler,
                                      max_grad_norm=cfg.get("clip_grad_norm"),
                                      offload_activations=cfg.get("enable_activation_offloading", False))

    metric_logger = instantiate(cfg.metric_logger) if env.is_main_process else MetricLogger()
    loop = TrainingLoop(
        total_steps, save, metric_logger, env.device, start_step=step, gradient_accumulation_steps=accum,
        save_every_n_steps=cfg.save_every_n_steps, log_every_n_steps=cfg.get("log_every_n_steps", 1),
        eval_every_n_steps=cfg.get("eval_every_n_steps"),
        validate=None if val_loader is None else partial(sharded_validation_loss, model, val_loader, loss_fn,
                                                         env.device),
        flops_per_token=partial(model_flops_per_token, model.args, full_finetune=True),
        last_checkpoint=resume_dir, progress_bar=cfg.get("progress_bar", True),
        is_main_process=env.is_main_process, any_rank=partial(any_rank, group=env.cpu_group))
    # every start check passed: the run writes from here on (the config, an overwritten run's deletion, an
    # abandoned run's later folders set aside)
    start_writing(cfg, output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if resumed is None else step, log=log, is_main_process=env.is_main_process)
    model.train()
    loop.run(loader, train_step, lr=lambda: float(optimizer.param_groups[0]["lr"]))  # a stop: saves, exits
    metric_logger.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    recipe_main(main)
