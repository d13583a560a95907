"""Preference tuning (DPO, IPO or SimPO) of a Llama model on many devices (FSDP2), launched by torchrun.

    tune run --nproc_per_node 8 lora_dpo_distributed --config llama3_1/8B_lora_dpo
    tune run --nproc_per_node 2 lora_dpo_distributed --config quickstart/lora_dpo_distributed   (CPU, gloo)

As ``lora_dpo_single_device``, sharded: the model builder decides what trains (a ``lora_*`` builder the
adapters, the reference being the sharded policy with its adapters disabled; a plain builder every weight,
against a frozen copy of the input model sharded like the policy: ``full_dpo_distributed`` is this recipe
under the name its configs use). ``batch_size`` is the global count of pairs per micro-batch (all ranks
together); the loss is divided by the pairs of the whole optimizer step over every rank, so N ranks train
exactly as one device with the same global batch, and the metrics (``loss``, ``rewards/*``) are those of
all ranks. Every save writes the single-device recipe's ``step_<N>/`` plus ``distributed/`` (DCP: the
trainable weights + optimizer) for ``resume_from_checkpoint``, at this or another world size. The setup
shared with the single-device recipe is torchft.training.preference_setup; the file reads top to bottom.
"""
import logging
from functools import partial

import torch.distributed as dist
from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.training.distributed import init_distributed, per_rank_batch_size
from torchft.training.estimate import warn_if_over_memory
from torchft.training.metric_logging import MetricLogger
from torchft.training.preference_setup import (build_preference_models, preference_loaders, preference_loop,
                                               training_references)
from torchft.training.setup import start_writing
from torchft.training.wiring import (LOOP_KEYS, builds_adapters, resume_and_save, run_identity_checked, start_run,
                                     train, trainable_params)

log = logging.getLogger("torchft")


def main(cfg: DictConfig, recipe: str = "lora_dpo_distributed") -> None:
    """``recipe``: the name this run is launched under (``full_dpo_distributed`` calls this ``main``)."""
    # ------------------------------------------------------------------ setup: checks before any work
    env = init_distributed(cfg.device, timeout_minutes=cfg.get("timeout_minutes", 10),
                           replicas=cfg.get("replicas", 1), recipe=recipe)
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed,
                    cpu_threads=cfg.get("cpu_threads"), env=env)

    # ------------------------------------------------------------------ setup: model (each rank its shards)
    if run.is_main_process and cfg.get("base_model") is not None:  # the quickstart's tiny base model
        instantiate(cfg.base_model)
    dist.barrier()
    build, loss_fn = partial(instantiate, cfg.model), instantiate(cfg.loss)
    adapters = builds_adapters(cfg.model)  # lora_* / qlora_*: adapters train; a plain builder: every weight
    checkpointer = instantiate(cfg.checkpointer)
    model, reference = build_preference_models(build, checkpointer, run, loss_fn, adapters=adapters,
                                               activation_checkpointing=cfg.enable_activation_checkpointing,
                                               compile=cfg.compile, fp32_reduce=cfg.get("fp32_reduce", False),
                                               cpu_offload=cfg.get("cpu_offload", False))
    identity = run_identity_checked(recipe, model, run)

    # ------------------------------------------------------------------ setup: data (each rank its pairs)
    tokenizer = instantiate(cfg.tokenizer)
    # the datasets are read once the tokenizer is checked
    make_val_dataset = None if cfg.get("validation_dataset") is None else partial(instantiate, cfg.validation_dataset)
    loader, val_loader, total_steps = preference_loaders(
        tokenizer, partial(instantiate, cfg.dataset), make_val_dataset,
        per_rank_batch_size(cfg.batch_size, env.world_size), run, vocab_size=model.args.vocab_size,
        tokenizer_path=cfg.tokenizer.get("path"), seed=cfg.seed, shuffle=cfg.get("shuffle", True),
        max_steps=cfg.get("max_steps"), epochs=cfg.get("epochs"),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    # reference: precomputed: every pair's reference log-probs once, before training; the reference model is dropped
    reference, val_reference = training_references(reference, loader, val_loader, run,
                                                    mode=cfg.get("reference", "model"))

    # ------------------------------------------------------------------ setup: optimization and saves
    optimizer = instantiate(cfg.optimizer, trainable_params(model))
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    # a resumed run: the trainable weights and optimizer from the DCP shards, resharded to this world size
    step, save = resume_and_save(run, checkpointer, model, optimizer, lr_scheduler, loader, adapters=adapters,
                                 identity=identity, global_batch_size=cfg.batch_size,
                                 async_save=cfg.get("async_save", False))  # DCP shards written in the background

    # ------------------------------------------------------------------ loop
    metric_logger = instantiate(cfg.metric_logger) if run.is_main_process else MetricLogger()
    loop, train_step = preference_loop(run, model, loss_fn, reference, val_reference, optimizer, lr_scheduler,
                                       save, metric_logger, val_loader, total_steps=total_steps, start_step=step,
                                       adapters=adapters, max_grad_norm=cfg.get("clip_grad_norm"),
                                       offload_activations=cfg.get("enable_activation_offloading", False),
                                       **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if run.resumed is None else step, log=log, is_main_process=run.is_main_process)
    warn_if_over_memory(cfg, run.device)  # one line on CUDA when the estimated peak exceeds free memory
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits
    dist.destroy_process_group()


if __name__ == "__main__":
    recipe_main(main)
