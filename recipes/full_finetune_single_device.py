"""Full fine-tuning of a Llama model on one device: every weight trains.

    tune run full_finetune_single_device --config llama3_2/1B_full_single_device
    tune run full_finetune_single_device --config quickstart/full_single_device max_steps=20

``optimizer_in_backward=true`` applies AdamW to each weight as soon as its gradient is ready and
frees the gradient (no whole-model gradient in memory; needs gradient_accumulation_steps=1 and no
clip_grad_norm). Every save writes ``<output_dir>/step_<N>/``: the model as an HF folder and
``training_state.pt`` for ``resume_from_checkpoint``. With ``teacher_model`` / ``teacher_checkpointer``
(knowledge_distillation_single_device with a plain student builder) a frozen teacher's distributions
join the loss (docs/distillation.md). The file reads top to bottom: setup, loop, save.
"""
import logging
from functools import partial

from omegaconf import DictConfig

from torchft.config import check_start, instantiate, recipe_main
from torchft.training.checkpointing import cpu_state_dict
from torchft.training.distillation import with_teacher
from torchft.training.estimate import warn_if_over_memory
from torchft.training.optim import OptimizerInBackward
from torchft.training.qat import qat_settings, with_fake_quant_schedule
from torchft.training.samples import print_samples
from torchft.training.setup import check_tokenizer_fits, start_writing
from torchft.training.state import restore_training_state, training_state
from torchft.training.throughput import model_flops_per_token
from torchft.training.wiring import (LOOP_KEYS, build_loaders, build_model, check_offload_memory, log_model,
                                     make_loop, run_length, sft_train_step, sft_validation, start_run, train,
                                     trainable_params)

log = logging.getLogger("torchft")


def main(cfg: DictConfig) -> None:
    # ------------------------------------------------------------------ setup: checks before any work
    check_start(cfg)  # all a run refuses before any work, as `tune validate` reports it; nothing written yet
    in_backward = cfg.get("optimizer_in_backward", False)
    run = start_run(cfg.output_dir, cfg.get("resume_from_checkpoint"), cfg.device, cfg.dtype, seed=cfg.seed,
                    cpu_threads=cfg.get("cpu_threads"))
    device, resumed = run.device, run.resumed

    # ------------------------------------------------------------------ setup: model
    if cfg.get("base_model") is not None:  # the quickstart writes its tiny base model here if missing
        instantiate(cfg.base_model)
    if cfg.get("teacher_base_model") is not None:  # the distillation quickstart's tiny teacher, likewise
        instantiate(cfg.teacher_base_model)
    qat = qat_settings(cfg.get("qat"))  # quantization-aware training: fake-quantized linears (docs/qat.md)
    checkpointer = instantiate(cfg.checkpointer)

    # a resumed run continues from the weights of its step folder, the others from the input model
    model = build_model(partial(instantiate, cfg.model), checkpointer, run, trainable="all",
                        activation_checkpointing=cfg.enable_activation_checkpointing, compile=cfg.compile,
                        tiled_mlp_tokens=cfg.get("tiled_mlp_tokens"), qat=qat)
    log_model(model, run)

    # ------------------------------------------------------------------ setup: data
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer.vocab_size, model.args.vocab_size, cfg.tokenizer.get("path"))
    # offloaded activations: refused off CUDA, and before any step when the host RAM cannot hold them
    check_offload_memory(model, run, cfg.batch_size, tokenizer.max_seq_len,
                         enabled=cfg.get("enable_activation_offloading", False))
    val_dataset = cfg.get("validation_dataset")
    loader, val_loader = build_loaders(
        instantiate(cfg.dataset, tokenizer=tokenizer),
        None if val_dataset is None else instantiate(val_dataset, tokenizer=tokenizer),
        cfg.batch_size, run, seed=cfg.seed, pad_id=tokenizer.pad_id, shuffle=cfg.get("shuffle", True))
    total_steps = run_length(run, cfg.get("max_steps"), cfg.get("epochs"), len(loader),
                             cfg.gradient_accumulation_steps)  # a resume past it is refused here

    # ------------------------------------------------------------------ setup: optimization and logging
    if in_backward:  # the same AdamW settings, applied per weight from its gradient hook
        settings = {k: v for k, v in cfg.optimizer.items() if k != "_component_"}
        optimizer = OptimizerInBackward(trainable_params(model), **settings)
    else:
        optimizer = instantiate(cfg.optimizer, trainable_params(model))
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = val_loss_fn = instantiate(cfg.loss, compile=cfg.compile)
    if cfg.get("teacher_model") is not None:  # knowledge distillation: a frozen teacher sharing the tokenizer
        loss_fn, val_loss_fn = with_teacher(loss_fn, partial(instantiate, cfg.teacher_model),
                                            instantiate(cfg.teacher_checkpointer), run,
                                            student_vocab_size=model.args.vocab_size, compile=cfg.compile)
    step = 0
    if resumed is not None:
        step = restore_training_state(resumed, optimizer, lr_scheduler, loader)
        log.info("resumed from %s at step %d", run.resume_dir, step)

    def save(step: int) -> str:
        path = checkpointer.save(step, cpu_state_dict(model),
                                 training_state=training_state(step, optimizer, lr_scheduler, loader))
        return str(path)

    prompts = list(cfg.get("sample_prompts") or [])
    if prompts:
        print_samples("samples before fine-tuning:", model, tokenizer, prompts, cfg.sample_max_new_tokens)

    # ------------------------------------------------------------------ loop
    train_step = sft_train_step(model, loss_fn, optimizer, lr_scheduler, run,
                                max_grad_norm=cfg.get("clip_grad_norm"),
                                offload_activations=cfg.get("enable_activation_offloading", False))
    train_step = with_fake_quant_schedule(train_step, model, qat, start_step=step)  # qat.fake_quant_after_n_steps
    metric_logger = instantiate(cfg.metric_logger)
    loop = make_loop(run, total_steps, save, metric_logger, start_step=step,
                     validate=sft_validation(model, val_loader, val_loss_fn, run),
                     flops_per_token=partial(model_flops_per_token, model.args, full_finetune=True),
                     **{key: cfg[key] for key in LOOP_KEYS if key in cfg})
    # every start check passed: the run writes from here on (the config, an overwritten run's deletion, an
    # abandoned run's later folders set aside)
    start_writing(cfg, run.output_dir, metric_logger, overwrite=cfg.get("overwrite_output_dir", False),
                  resumed_step=None if resumed is None else step, log=log)
    warn_if_over_memory(cfg, device)  # one line on CUDA when the estimated peak exceeds free memory
    train(loop, model, loader, train_step, optimizer, metric_logger)  # a stop: saves, exits

    # ------------------------------------------------------------------ after training
    if prompts:
        print_samples("samples after fine-tuning:", model, tokenizer, prompts, cfg.sample_max_new_tokens)


if __name__ == "__main__":
    recipe_main(main)
