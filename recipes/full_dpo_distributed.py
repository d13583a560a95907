"""Full-weight preference tuning (DPO, IPO or SimPO) of a Llama model on many devices (FSDP2), torchrun.

    tune run --nproc_per_node 8 full_dpo_distributed --config llama3_1/8B_full_dpo
    tune run --nproc_per_node 2 full_dpo_distributed --config quickstart/full_dpo_distributed   (CPU, gloo)

Every weight trains; the reference is a frozen copy of the input model, sharded like the policy (its
weights count once more per rank: ``tune estimate`` includes them; SimPO needs no reference and builds
none). The loss, metrics and batch sizes are those of ``lora_dpo_distributed``: divided by the step's
pairs over every rank, so N ranks train as one device with the same global batch. The optimizer is the
full SFT recipes' (bf16 weights with stochastic rounding). Saves hold the whole model in ``step_<N>/``
plus ``distributed/`` (DCP: weights + optimizer) for ``resume_from_checkpoint``; the reference is always
the input model, also on a resumed run. The file reads top to bottom.
"""
import logging
from functools import partial

import torch.distributed as dist
from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.data.preference import preference_collate
from torchft.training.distributed import init_distributed, per_rank_batch_size
from torchft.training.estimate import warn_if_over_memory
from torchft.training.metric_logging import MetricLogger
from torchft.training.preference import frozen_reference, preference_train_step, preference_validate
from torchft.training.setup import check_tokenizer_fits, start_writing
from torchft.training.throughput import model_flops_per_token
from torchft.training.wiring import (LOOP_KEYS, build_loaders, build_sharded_model, log_model, make_loop,
                                     resume_sharded, run_identity_checked, run_length, sharded_save, start_run,
                                     train, trainable_params)

log = logging.getLogger("torchft")
RECIPE = "full_dpo_distributed"


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    env = init_distributed(cfg.device, timeout_minutes=cfg.get("timeout_minutes", 10),
                           replicas=cfg.get("replicas", 1), recipe=RECIPE)
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    local_batch = per_rank_batch_size(cfg.batch_size, env.world_size)
    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed,
                    cpu_threads=cfg.get("cpu_threads"), env=env)

    # ------------------------------------------------------------------ setup: model (policy and frozen reference)
    if run.is_main_process and cfg.get("base_model") is not None:  # the quickstart's tiny base model
        instantiate(cfg.base_model)
    dist.barrier()
    checkpointer = instantiate(cfg.checkpointer)
    model = build_sharded_model(partial(instantiate, cfg.model), checkpointer, run, trainable="all",
                                activation_checkpointing=cfg.enable_activation_checkpointing, compile=cfg.compile,
                                fp32_reduce=cfg.get("fp32_reduce", False), cpu_offload=cfg.get("cpu_offload", False))
    identity = run_identity_checked(RECIPE, model, run)
    log_model(model, run)
    loss_fn = instantiate(cfg.loss)
    reference = None
    if loss_fn.needs_reference:  # a frozen, sharded copy of the input model (not of a resumed policy)
        reference_model = build_sharded_model(partial(instantiate, cfg.model), checkpointer, run, trainable="none",
                                              compile=cfg.compile, cpu_offload=cfg.get("cpu_offload", False))
        reference = partial(frozen_reference, reference_model, loss_fn)

    # ------------------------------------------------------------------ setup: data (each rank its pairs)
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer.vocab_size, model.args.vocab_size, cfg.tokenizer.get("path"))
    val_dataset = cfg.get("validation_dataset")
    loader, val_loader = build_loaders(
        instantiate(cfg.dataset, tokenizer=tokenizer),
        None if val_dataset is None else instantiate(val_dataset, tokenizer=tokenizer),
        local_batch, run, seed=cfg.seed, pad_id=tokenizer.pad_id, shuffle=cfg.get("shuffle", True),
        collate_fn=partial(preference_collate, pad_id=tokenizer.pad_id))
    total_steps = run_length(run, cfg.get("max_steps"), cfg.get("epochs"), len(loader),
                             cfg.gradient_accumulation_steps)  # a resume past it is refused here

    # ------------------------------------------------------------------ setup: optimization and logging
    optimizer = instantiate(cfg.optimizer, trainable_params(model))
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    # a resumed run: weights and optimizer from the DCP shards, resharded to this world size
    step = resume_sharded(run, model, optimizer, lr_scheduler, loader, adapters_only=False,
                          global_batch_size=cfg.batch_size)
    save = sharded_save(run, checkpointer, model, optimizer, lr_scheduler, loader, identity,
                        adapters_only=False, global_batch_size=cfg.batch_size,
                        async_save=cfg.get("async_save", False))  # DCP shards written in the background

    # ------------------------------------------------------------------ loop
    train_step = preference_train_step(model, loss_fn, optimizer, lr_scheduler, reference, sharded=True,
                                       max_grad_norm=cfg.get("clip_grad_norm"),
                                       offload_activations=cfg.get("enable_activation_offloading", False))
    metric_logger = instantiate(cfg.metric_logger) if run.is_main_process else MetricLogger()
    loop = make_loop(run, total_steps, save, metric_logger, start_step=step,
                     validate=preference_validate(model, val_loader, loss_fn, reference, run.device),
                     flops_per_token=partial(model_flops_per_token, model.args, full_finetune=True),
                     **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if run.resumed is None else step, log=log, is_main_process=run.is_main_process)
    warn_if_over_memory(cfg, run.device)  # one line on CUDA when the estimated peak exceeds free memory
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits
    dist.destroy_process_group()


if __name__ == "__main__":
    recipe_main(main)
