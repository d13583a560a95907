"""Preference tuning (DPO, IPO or SimPO) of a Llama model on one device: LoRA adapters or every weight.

    tune run lora_dpo_single_device --config llama3_2/1B_lora_dpo_single_device
    tune run lora_dpo_single_device --config quickstart/lora_dpo_single_device max_steps=20

The data are pairs (``prompt``, ``chosen``, ``rejected``; see ``torchft.data.preference``). The model
builder decides what trains: a ``lora_*`` / ``qlora_*`` builder trains adapters and the reference is the
base itself (the same weights with the adapters disabled, no second copy); a plain builder trains every
weight against a frozen copy of the input model (``full_dpo_single_device`` is this recipe under the name
its configs use). ``loss.loss_type`` picks ``dpo`` (with ``beta`` and ``label_smoothing``), ``ipo`` or the
reference-free ``simpo``. Every save writes ``<output_dir>/step_<N>/`` as the SFT recipes do: the model as
an HF folder (merged, plus the PEFT adapter in ``step_<N>/adapter/``, for LoRA) and ``training_state.pt``
for ``resume_from_checkpoint``. The metrics carry TRL's names: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins`` (and ``val_``-prefixed on the validation
pairs). The setup shared with ``lora_dpo_distributed`` is torchft.training.preference_setup; the file
reads top to bottom.
"""
import logging
from functools import partial

from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.training.estimate import warn_if_over_memory
from torchft.training.preference_setup import (build_preference_models, preference_loaders, preference_loop,
                                               training_references)
from torchft.training.setup import start_writing
from torchft.training.wiring import LOOP_KEYS, builds_adapters, resume_and_save, start_run, train, trainable_params

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed,
                    cpu_threads=cfg.get("cpu_threads"))

    # ------------------------------------------------------------------ setup: model (policy and reference)
    if cfg.get("base_model") is not None:  # the quickstart writes its tiny base model here if missing
        instantiate(cfg.base_model)
    build, loss_fn = partial(instantiate, cfg.model), instantiate(cfg.loss)
    adapters = builds_adapters(cfg.model)  # lora_* / qlora_*: adapters train; a plain builder: every weight
    checkpointer = instantiate(cfg.checkpointer)
    model, reference = build_preference_models(build, checkpointer, run, loss_fn, adapters=adapters,
                                               activation_checkpointing=cfg.enable_activation_checkpointing,
                                               compile=cfg.compile)

    # ------------------------------------------------------------------ setup: data (pairs)
    tokenizer = instantiate(cfg.tokenizer)
    # the datasets are read once the tokenizer is checked
    make_val_dataset = None if cfg.get("validation_dataset") is None else partial(instantiate, cfg.validation_dataset)
    loader, val_loader, total_steps = preference_loaders(
        tokenizer, partial(instantiate, cfg.dataset), make_val_dataset, cfg.batch_size, run,
        vocab_size=model.args.vocab_size, tokenizer_path=cfg.tokenizer.get("path"), seed=cfg.seed,
        shuffle=cfg.get("shuffle", True), max_steps=cfg.get("max_steps"), epochs=cfg.get("epochs"),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    # reference: precomputed: every pair's reference log-probs once, before training; the reference model is dropped
    reference, val_reference = training_references(reference, loader, val_loader, run,
                                                    mode=cfg.get("reference", "model"))

    # ------------------------------------------------------------------ setup: optimization and saves
    optimizer = instantiate(cfg.optimizer, trainable_params(model))
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    step, save = resume_and_save(run, checkpointer, model, optimizer, lr_scheduler, loader, adapters=adapters)

    # ------------------------------------------------------------------ loop
    metric_logger = instantiate(cfg.metric_logger)
    loop, train_step = preference_loop(run, model, loss_fn, reference, val_reference, optimizer, lr_scheduler,
                                       save, metric_logger, val_loader, total_steps=total_steps, start_step=step,
                                       adapters=adapters, max_grad_norm=cfg.get("clip_grad_norm"),
                                       offload_activations=cfg.get("enable_activation_offloading", False),
                                       **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if run.resumed is None else step, log=log)
    warn_if_over_memory(cfg, run.device)  # one line on CUDA when the estimated peak exceeds free memory
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits


if __name__ == "__main__":
    recipe_main(main)
