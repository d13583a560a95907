"""LoRA, DoRA and QLoRA fine-tuning of a Llama model on many devices (FSDP2), launched by torchrun.

    tune run --nproc_per_node 8 lora_finetune_distributed --config llama3_1/8B_lora
    tune run --nproc_per_node 2 lora_finetune_distributed --config quickstart/lora_distributed   (CPU, gloo)

DoRA is ``model.use_dora=true``; QLoRA is a ``qlora_*`` model builder; ``teacher_model`` /
``teacher_checkpointer`` add a frozen, sharded teacher (knowledge_distillation_distributed, docs/distillation.md). ``batch_size`` is the global
micro-batch (all ranks together): N ranks with batch_size B train exactly as one device with B. The
base model is sharded per decoder layer and streamed in, each rank reading only its rows. Every save
writes the same ``<output_dir>/step_<N>/`` as the single-device recipe (merged HF model +
``adapter/``) plus ``distributed/`` (DCP: adapters + optimizer) for ``resume_from_checkpoint``, at
this or another world size. The file reads top to bottom: setup, loop, save.
"""
import logging
from functools import partial

import torch.distributed as dist
from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.training.distillation import with_teacher
from torchft.training.distributed import init_distributed, per_rank_batch_size
from torchft.training.estimate import warn_if_over_memory
from torchft.training.metric_logging import MetricLogger
from torchft.training.qat import qat_settings, with_fake_quant_schedule
from torchft.training.samples import print_samples
from torchft.training.setup import check_tokenizer_fits, start_writing
from torchft.training.throughput import model_flops_per_token
from torchft.training.wiring import (LOOP_KEYS, build_loaders, build_sharded_model, check_offload_memory, log_model,
                                     make_loop, resume_sharded, run_identity_checked, run_length, sft_train_step,
                                     sft_validation, sharded_save, start_run, train, trainable_params)

log = logging.getLogger("torchft")
RECIPE = "lora_finetune_distributed"


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    env = init_distributed(cfg.device, timeout_minutes=cfg.get("timeout_minutes", 10),
                           replicas=cfg.get("replicas", 1), recipe=RECIPE)
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    local_batch = per_rank_batch_size(cfg.batch_size, env.world_size)
    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed,
                    cpu_threads=cfg.get("cpu_threads"), env=env)

    # ------------------------------------------------------------------ setup: model (each rank its shards)
    if run.is_main_process and cfg.get("base_model") is not None:  # the quickstart's tiny base model
        instantiate(cfg.base_model)
    if run.is_main_process and cfg.get("teacher_base_model") is not None:  # the distillation quickstart's teacher
        instantiate(cfg.teacher_base_model)
    dist.barrier()
    qat = qat_settings(cfg.get("qat"))  # quantization-aware training: fake-quantized linears (docs/qat.md)
    checkpointer = instantiate(cfg.checkpointer)
    model = build_sharded_model(partial(instantiate, cfg.model), checkpointer, run, trainable="adapters",
                                activation_checkpointing=cfg.enable_activation_checkpointing, compile=cfg.compile,
                                tiled_mlp_tokens=cfg.get("tiled_mlp_tokens"),
                                fp32_reduce=cfg.get("fp32_reduce", False), cpu_offload=cfg.get("cpu_offload", False),
                                qat=qat)
    identity = run_identity_checked(RECIPE, model, run)
    log_model(model, run)

    # ------------------------------------------------------------------ setup: data (each rank its share)
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer.vocab_size, model.args.vocab_size, cfg.tokenizer.get("path"))
    # offloaded activations: refused off CUDA, and before any step when the host RAM cannot hold them
    check_offload_memory(model, run, local_batch, tokenizer.max_seq_len,
                         enabled=cfg.get("enable_activation_offloading", False))
    val_dataset = cfg.get("validation_dataset")
    loader, val_loader = build_loaders(
        instantiate(cfg.dataset, tokenizer=tokenizer),
        None if val_dataset is None else instantiate(val_dataset, tokenizer=tokenizer),
        local_batch, run, seed=cfg.seed, pad_id=tokenizer.pad_id, shuffle=cfg.get("shuffle", True))
    total_steps = run_length(run, cfg.get("max_steps"), cfg.get("epochs"), len(loader),
                             cfg.gradient_accumulation_steps)  # a resume past it is refused here

    # ------------------------------------------------------------------ setup: optimization and logging
    optimizer = instantiate(cfg.optimizer, trainable_params(model))
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = val_loss_fn = instantiate(cfg.loss, compile=cfg.compile)
    if cfg.get("teacher_model") is not None:  # knowledge distillation: a frozen teacher sharing the tokenizer
        loss_fn, val_loss_fn = with_teacher(loss_fn, partial(instantiate, cfg.teacher_model),
                                            instantiate(cfg.teacher_checkpointer), run,
                                            student_vocab_size=model.args.vocab_size, compile=cfg.compile)
    # a resumed run: adapters and optimizer from the DCP shards, resharded to this world size
    step = resume_sharded(run, model, optimizer, lr_scheduler, loader, adapters_only=True,
                          global_batch_size=cfg.batch_size)
    save = sharded_save(run, checkpointer, model, optimizer, lr_scheduler, loader, identity,
                        adapters_only=True, global_batch_size=cfg.batch_size,
                        async_save=cfg.get("async_save", False))  # DCP shards written in the background

    prompts = list(cfg.get("sample_prompts") or [])  # every rank generates (FSDP2), the main process prints
    if prompts:
        print_samples("samples before fine-tuning:", model, tokenizer, prompts, cfg.sample_max_new_tokens,
                      show=run.is_main_process)

    # ------------------------------------------------------------------ loop
    train_step = sft_train_step(model, loss_fn, optimizer, lr_scheduler, run,
                                max_grad_norm=cfg.get("clip_grad_norm"),
                                offload_activations=cfg.get("enable_activation_offloading", False))
    train_step = with_fake_quant_schedule(train_step, model, qat, start_step=step)  # qat.fake_quant_after_n_steps
    metric_logger = instantiate(cfg.metric_logger) if run.is_main_process else MetricLogger()
    loop = make_loop(run, total_steps, save, metric_logger, start_step=step,
                     validate=sft_validation(model, val_loader, val_loss_fn, run),
                     flops_per_token=partial(model_flops_per_token, model.args, full_finetune=False),
                     **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    # every start check passed: the run writes from here on (the config, an overwritten run's deletion, an
    # abandoned run's later folders set aside)
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if run.resumed is None else step, log=log, is_main_process=run.is_main_process)
    warn_if_over_memory(cfg, run.device)  # one line on CUDA when the estimated peak exceeds free memory
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits

    # ------------------------------------------------------------------ after training
    if prompts:
        print_samples("samples after fine-tuning:", model, tokenizer, prompts, cfg.sample_max_new_tokens,
                      show=run.is_main_process)
    dist.destroy_process_group()


if __name__ == "__main__":
    recipe_main(main)
