"""LoRA preference tuning (DPO, IPO or SimPO) of a Llama model on one device.

    tune run lora_dpo_single_device --config llama3_2/1B_lora_dpo_single_device
    tune run lora_dpo_single_device --config quickstart/lora_dpo_single_device max_steps=20

The data are pairs (``prompt``, ``chosen``, ``rejected``; see ``torchft.data.preference``). The reference
model is the base itself: the same weights with the adapters disabled, so DPO holds no second copy.
``loss.loss_type`` picks ``dpo`` (with ``beta`` and ``label_smoothing``), ``ipo`` or the reference-free
``simpo``. Every save writes ``<output_dir>/step_<N>/`` as the SFT recipes do: the merged model as an HF
folder, the PEFT adapter in ``step_<N>/adapter/`` and ``training_state.pt`` for ``resume_from_checkpoint``.
The metrics carry TRL's names: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins`` (and ``val_``-prefixed on the validation pairs). The file reads top to bottom.
"""
import logging
from functools import partial

from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.data.preference import preference_collate
from torchft.training.checkpointing import adapter_state_dict_cpu
from torchft.training.estimate import warn_if_over_memory
from torchft.training.preference import adapters_disabled_reference, preference_train_step, preference_validate
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

    # ------------------------------------------------------------------ setup: model (policy and reference)
    if cfg.get("base_model") is not None:  # the quickstart writes its tiny base model here if missing
        instantiate(cfg.base_model)
    checkpointer = instantiate(cfg.checkpointer)
    model = build_model(partial(instantiate, cfg.model), checkpointer, run, trainable="adapters",
                        activation_checkpointing=cfg.enable_activation_checkpointing, compile=cfg.compile)
    log_model(model, run)
    loss_fn = instantiate(cfg.loss)
    reference = adapters_disabled_reference(model, loss_fn)  # the base: the policy with adapters off

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
        return str(checkpointer.save(
            step, model, adapter_model=model,  # merged HF folder + step_<N>/adapter/
            training_state=training_state(step, optimizer, lr_scheduler, loader, adapter_state_dict_cpu(model))))

    # ------------------------------------------------------------------ loop
    train_step = preference_train_step(model, loss_fn, optimizer, lr_scheduler, reference, sharded=False,
                                       max_grad_norm=cfg.get("clip_grad_norm"),
                                       offload_activations=cfg.get("enable_activation_offloading", False))
    metric_logger = instantiate(cfg.metric_logger)
    loop = make_loop(run, total_steps, save, metric_logger, start_step=step,
                     validate=preference_validate(model, val_loader, loss_fn, reference, run.device),
                     flops_per_token=partial(model_flops_per_token, model.args, full_finetune=False),
                     **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if run.resumed is None else step, log=log)
    warn_if_over_memory(cfg, run.device)
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits


if __name__ == "__main__":
    recipe_main(main)
