"""LoRA, DoRA and QLoRA fine-tuning of a Llama model on one device.

    tune run lora_finetune_single_device --config llama3_2/1B_lora_single_device
    tune run lora_finetune_single_device --config quickstart/lora_single_device max_steps=20

DoRA is ``model.use_dora=true``; QLoRA is a ``qlora_*`` model builder (NF4 base weights). The base
model stays frozen; only the adapters train. Every save writes ``<output_dir>/step_<N>/``: the merged
model as an HF folder, the PEFT adapter in ``step_<N>/adapter/`` (``adapter_model.safetensors`` +
``adapter_config.json``) and ``training_state.pt`` for ``resume_from_checkpoint``. The file reads
top to bottom: setup, loop, save.
"""
import logging
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from torchft.checkpoint import load_training_state, resolve_resume_dir
from torchft.config import check_start, instantiate, recipe_main
from torchft.data.dataloader import build_dataloader
from torchft.training.activations import apply_activation_checkpointing
from torchft.training.checkpointing import adapter_state_dict_cpu
from torchft.training.compile import compile_layers
from torchft.training.estimate import warn_if_over_memory
from torchft.training.loop import TrainingLoop
from torchft.training.precision import resolve_device, resolve_dtype
from torchft.training.rng import seed_everything
from torchft.training.samples import print_samples
from torchft.training.setup import (check_same_architecture, check_tokenizer_fits, default_dtype,
                                    load_adapter_model, model_args_summary, start_writing)
from torchft.training.state import restore_training_state, training_state
from torchft.training.steps import (check_resume_step, StepResult, optimizer_step, total_training_steps,
                                    validation_loss)
from torchft.training.throughput import model_flops_per_token

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    output_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.get("cpu_threads"):  # intra-op threads of CPU runs (a tiny model is fastest on one)
        torch.set_num_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)

    # ------------------------------------------------------------------ setup: model
    if cfg.get("base_model") is not None:  # the quickstart writes its tiny base model here if missing
        instantiate(cfg.base_model)
    checkpointer = instantiate(cfg.checkpointer)
    resume_dir = resolve_resume_dir(cfg.get("resume_from_checkpoint"), output_dir)
    resumed = load_training_state(resume_dir) if resume_dir is not None else None

    with torch.device("meta"), default_dtype(dtype):
        model = instantiate(cfg.model)  # a lora_* / qlora_* builder: LoRA layers where the config asks
    check_same_architecture(model.args, checkpointer.model_args, cfg.checkpointer.checkpoint_dir)
    load_adapter_model(model, checkpointer.load_model_state_dict(), device, dtype,
                       adapter_state_dict=resumed["adapter"] if resumed else None)
    if cfg.enable_activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("model: %s; %.2fM trainable of %.2fM parameters", model_args_summary(model.args),
             sum(p.numel() for p in trainable) / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)

    # ------------------------------------------------------------------ setup: data
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer.vocab_size, model.args.vocab_size, cfg.tokenizer.get("path"))
    dataset = instantiate(cfg.dataset, tokenizer=tokenizer)
    loader = build_dataloader(dataset, cfg.batch_size, shuffle=cfg.get("shuffle", True), seed=cfg.seed,
                              pad_id=tokenizer.pad_id, device=device)
    val_loader = None
    if cfg.get("validation_dataset") is not None:
        val_loader = build_dataloader(instantiate(cfg.validation_dataset, tokenizer=tokenizer), cfg.batch_size,
                                      shuffle=False, drop_last=False, pad_id=tokenizer.pad_id, device=device)
    accum = cfg.gradient_accumulation_steps
    total_steps = total_training_steps(cfg.get("max_steps"), cfg.get("epochs"), len(loader), accum)

    # ------------------------------------------------------------------ setup: optimization and logging
    optimizer = instantiate(cfg.optimizer, trainable)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = instantiate(cfg.loss, compile=cfg.compile)
    step = 0
    if resumed is not None:
        step = restore_training_state(resumed, optimizer, lr_scheduler, loader)
        check_resume_step(step, total_steps)  # a finished run refuses, saying how to go on
        log.info("resumed from %s at step %d", resume_dir, step)

    def save(step: int) -> str:
        path = checkpointer.save(
            step, model,  # the merged model (adapters merged onto checkpoint_dir's weights): a plain HF folder
            adapter_model=model,  # step_<N>/adapter/: the PEFT adapter alone
            training_state=training_state(step, optimizer, lr_scheduler, loader, adapter_state_dict_cpu(model)))
        return str(path)

    prompts = list(cfg.get("sample_prompts") or [])
    if prompts:
        print_samples("samples before fine-tuning:", model, tokenizer, prompts, cfg.sample_max_new_tokens)

    # ------------------------------------------------------------------ loop
    def train_step(micro_batches: list[dict], step: int) -> StepResult:
        return optimizer_step(model, micro_batches, loss_fn, optimizer, lr_scheduler,
                              max_grad_norm=cfg.get("clip_grad_norm"),
                              offload_activations=cfg.get("enable_activation_offloading", False))

    metric_logger = instantiate(cfg.metric_logger)
    loop = TrainingLoop(
        total_steps, save, metric_logger, device, start_step=step, gradient_accumulation_steps=accum,
        save_every_n_steps=cfg.save_every_n_steps, log_every_n_steps=cfg.get("log_every_n_steps", 1),
        eval_every_n_steps=cfg.get("eval_every_n_steps"),
        validate=None if val_loader is None else partial(validation_loss, model, val_loader, loss_fn, device),
        flops_per_token=partial(model_flops_per_token, model.args, full_finetune=False),
        last_checkpoint=resume_dir, progress_bar=cfg.get("progress_bar", True))
    # every start check passed: the run writes from here on (the config, an overwritten run's deletion, an
    # abandoned run's later folders set aside)
    start_writing(cfg, output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if resumed is None else step, log=log)
    warn_if_over_memory(cfg, device)  # one line on CUDA when the estimated peak exceeds free memory
    model.train()
    loop.run(loader, train_step, lr=lambda: float(optimizer.param_groups[0]["lr"]))  # a stop: saves, exits

    # ------------------------------------------------------------------ after training
    if prompts:
        print_samples("samples after fine-tuning:", model, tokenizer, prompts, cfg.sample_max_new_tokens)
    metric_logger.close()


if __name__ == "__main__":
    recipe_main(main)
