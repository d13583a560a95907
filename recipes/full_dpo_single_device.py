"""Full-weight preference tuning (DPO, IPO or SimPO) of a Llama model on one device.

    tune run full_dpo_single_device --config quickstart/full_dpo_single_device

As ``lora_dpo_single_device`` (data, losses, metrics, resume), with every weight trained and the reference
a frozen copy of the input model, loaded once beside the policy (its weights count twice: ``tune
estimate`` includes them; SimPO needs no reference and loads none). The reference is always the input
model, also on a resumed run. Every save writes ``<output_dir>/step_<N>/`` as ``full_finetune_single_device``
does. ``full_dpo_distributed`` is the same recipe on many devices. The file reads top to bottom.
"""
import logging
from functools import partial

from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.data.preference import preference_collate
from torchft.training.checkpointing import cpu_state_dict
from torchft.training.estimate import warn_if_over_memory
from torchft.training.preference import frozen_reference, preference_train_step, preference_validate
from torchft.training.setup import check_tokenizer_fits, start_writing
from torchft.training.state import restore_training_state, training_state
from torchft.training.throughput import model_flops_per_token
from torchft.training.wiring import (LOOP_KEYS, build_loaders, build_model, log_model, make_loop, run_length,
                                     start_run, train, trainable_params)

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed,
                    cpu_threads=cfg.get("cpu_threads"))

    # ------------------------------------------------------------------ setup: model (policy and frozen reference)
    if cfg.get("base_model") is not None:  # the quickstart writes its tiny base model here if missing
        instantiate(cfg.base_model)
    checkpointer = instantiate(cfg.checkpointer)
    model = build_model(partial(instantiate, cfg.model), checkpointer, run, trainable="all",
                        activation_checkpointing=cfg.enable_activation_checkpointing, compile=cfg.compile)
    log_model(model, run)
    loss_fn = instantiate(cfg.loss)
    reference = None
    if loss_fn.needs_reference:  # a frozen copy of the input model (not of a resumed policy)
        reference = partial(frozen_reference, build_model(partial(instantiate, cfg.model), checkpointer, run,
                                                          trainable="none", compile=cfg.compile), loss_fn)

    # ------------------------------------------------------------------ setup: data (pairs)
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer.vocab_size, model.args.vocab_size, cfg.tokenizer.get("path"))
    val_dataset = cfg.get("validation_dataset")
    loader, val_loader = build_loaders(
        instantiate(cfg.dataset, tokenizer=tokenizer),
        None if val_dataset is None else instantiate(val_dataset, tokenizer=tokenizer),
        cfg.batch_size, run, seed=cfg.seed, pad_id=tokenizer.pad_id, shuffle=cfg.get("shuffle", True),
        collate_fn=partial(preference_collate, pad_id=tokenizer.pad_id))
    total_steps = run_length(run, cfg.get("max_steps"), cfg.get("epochs"), len(loader),
                             cfg.gradient_accumulation_steps)

    # ------------------------------------------------------------------ setup: optimization and logging
    optimizer = instantiate(cfg.optimizer, trainable_params(model))
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    step = 0
    if run.resumed is not None:
        step = restore_training_state(run.resumed, optimizer, lr_scheduler, loader)
        log.info("resumed from %s at step %d", run.resume_dir, step)

    def save(step: int) -> str:
        return str(checkpointer.save(step, cpu_state_dict(model),
                                     training_state=training_state(step, optimizer, lr_scheduler, loader)))

    # ------------------------------------------------------------------ loop
    train_step = preference_train_step(model, loss_fn, optimizer, lr_scheduler, reference, sharded=False,
                                       max_grad_norm=cfg.get("clip_grad_norm"),
                                       offload_activations=cfg.get("enable_activation_offloading", False))
    metric_logger = instantiate(cfg.metric_logger)
    loop = make_loop(run, total_steps, save, metric_logger, start_step=step,
                     validate=preference_validate(model, val_loader, loss_fn, reference, run.device),
                     flops_per_token=partial(model_flops_per_token, model.args, full_finetune=True),
                     **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if run.resumed is None else step, log=log)
    warn_if_over_memory(cfg, run.device)
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits


if __name__ == "__main__":
    recipe_main(main)
