"""The training loop every fine-tuning recipe shares: steps, metrics, validation, saves, stop handling.

A recipe builds its model, data and optimizer, then hands the loop two callables it owns, the train
step and the save, and runs it::

    def train_step(micro_batches: list[dict], step: int) -> StepResult:
        return optimizer_step(model, micro_batches, ...)           # forward, backward, update

    def save(step: int) -> str:
        return str(checkpointer.save(step, ...))                    # the step folder written

    loop = TrainingLoop(total_steps, save, metric_logger, device, start_step=step,
                        gradient_accumulation_steps=accum, save_every_n_steps=cfg.save_every_n_steps,
                        log_every_n_steps=cfg.log_every_n_steps, eval_every_n_steps=cfg.eval_every_n_steps,
                        validate=lambda: validation_loss(model, val_loader, loss_fn, device),
                        flops_per_token=partial(model_flops_per_token, model.args, full_finetune=True),
                        last_checkpoint=resume_dir)
    loop.run(loader, train_step, lr=lambda: float(optimizer.param_groups[0]["lr"]))
    # returns at total_steps; on SIGINT/SIGTERM it saves, then raises SystemExit(128 + signal)

Per optimizer step the loop draws ``gradient_accumulation_steps`` micro-batches (fewer at the end
of an epoch), moves them to the device, calls ``train_step``, and then, on its cadences: logs the metrics (every
``log_every_n_steps``), runs ``validate`` (every ``eval_every_n_steps`` and at the last step; at step
0 too on a fresh run) and calls ``save`` (every ``save_every_n_steps``, at the last step, and when a
stop was requested). It reads the step's values (loss, grad norm) back from the device only on
logging steps, and there and before every save checks that no step since the last check had a
non-finite loss or gradient (``StepResult.found_inf``; such a step's update was skipped on the
device), raising :class:`~torchft.training.steps.NonFiniteLossError` naming the last good checkpoint.
Running out of device memory becomes a ``MemoryError`` naming the settings that lower memory.

Distributed recipes use it unchanged: every rank runs the loop (``train_step``, ``validate`` and
``save`` may be collectives; they are called on every rank at the same steps); only the rank with
``is_main_process=True`` prints, logs and shows the progress bar. ``train_step`` returns global
values: it all-reduces the target-token count before backward and passes it as
``optimizer_step(..., num_target_tokens=...)`` (the loss's denominator), and all-reduces the loss
for logging; the gradient norm of sharded gradients is already global, so ``found_inf`` and the
non-finite check stop every rank at the same step.
``any_rank`` turns this rank's "stop requested" into the same decision on every rank; it is called
every step, so it must not wait for the device (e.g. an all-reduce MAX of a CPU flag on a gloo
group, :func:`torchft.training.distributed.any_rank`); without it the local flag decides.
A ``save`` whose folder is finished in the background (the distributed recipes' ``async_save``) comes
with ``finish_save``: the loop calls it after the last save, before a stop names the folder saved, and
when an error ends the run, so no save under way is lost at the end of a run.
Throughput metrics are global (``tokens_per_s`` of all ranks together); ``mfu`` divides the global
FLOP/s by ``world_size`` devices' peak, so it is the utilisation of each GPU.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from torchft.training.signals import StopRequested
from torchft.training.steps import (NonFiniteWatch, StepResult, check_resume_step, out_of_memory_message,
                                    step_micro_batches, to_device)
from torchft.training.throughput import ProgressBar, StepTimer, reset_peak_memory, step_metrics

log = logging.getLogger("torchft")


def _scalar(value) -> float | None:
    return None if value is None else float(value)


class TrainingLoop:
    """Runs optimizer steps from ``start_step`` to ``total_steps`` (see the module docstring).

    Args:
        total_steps: the last optimizer step of the run.
        save: ``save(step) -> str`` writes the step folder and returns its path (called on every rank).
        metric_logger: a :mod:`torchft.training.metric_logging` logger (used on the main process only).
        device: the training device (micro-batches are moved to it; timing and memory are measured on it).
        start_step: steps already done (a resumed run's step).
        gradient_accumulation_steps: micro-batches per optimizer step.
        save_every_n_steps / log_every_n_steps / eval_every_n_steps: the cadences (None: never, except
            that the last step always saves and validates).
        validate: ``validate() -> float``, the validation loss, or None for no validation.
        flops_per_token: ``flops_per_token(seq_len) -> float`` for the MFU estimate, or None.
        last_checkpoint: the folder the run resumed from, named in messages until the first save.
        progress_bar: show a tqdm bar (main process only).
        is_main_process: this process prints and logs.
        any_rank: ``any_rank(local_flag) -> bool``, the same stop decision on every rank (called every
            step: it must not read from the device).
        world_size: devices that train together, for the per-device MFU (None: the process group's
            size, 1 without one).
        finish_save: for a ``save`` that returns while its folder is still being written (in the
            background): ``finish_save()`` waits for it and puts the folder in place. The loop calls it
            before the run ends or names a checkpoint in a message, and when an error ends the run.
    """

    def __init__(self, total_steps: int, save: Callable[[int], str], metric_logger, device: torch.device, *,
                 start_step: int = 0, gradient_accumulation_steps: int = 1, save_every_n_steps: int | None = None,
                 log_every_n_steps: int | None = 1, eval_every_n_steps: int | None = None,
                 validate: Callable[[], float] | None = None, flops_per_token: Callable[[int], float] | None = None,
                 last_checkpoint=None, progress_bar: bool = True, is_main_process: bool = True,
                 any_rank: Callable[[bool], bool] | None = None, world_size: int | None = None,
                 finish_save: Callable[[], object] | None = None):
        check_resume_step(start_step, total_steps)
        self.total_steps, self.save, self.metric_logger = total_steps, save, metric_logger
        self.device = torch.device(device)
        self.step = start_step
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.save_every, self.log_every, self.eval_every = save_every_n_steps, log_every_n_steps, eval_every_n_steps
        self.validate, self.flops_per_token = validate, flops_per_token
        self.last_checkpoint = None if last_checkpoint is None else str(last_checkpoint)
        self.is_main_process = is_main_process
        self.any_rank = any_rank or (lambda local: local)
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.world_size = world_size
        self.finish_save = finish_save
        self._show_progress = progress_bar and is_main_process

    # ------------------------------------------------------------------ cadences
    @staticmethod
    def _every(step: int, n: int | None) -> bool:
        return bool(n) and step % n == 0

    def _is_last(self, step: int) -> bool:
        return step == self.total_steps

    # ------------------------------------------------------------------ output (main process only)
    def _log(self, metrics: dict, step: int) -> None:
        if self.is_main_process:
            self.metric_logger.log(metrics, step=step)

    def _write(self, progress: ProgressBar | None, message: str) -> None:
        if not self.is_main_process:
            return
        if progress is not None:
            progress.write(message)
        else:
            print(message)

    def _validate(self, step: int, progress: ProgressBar | None) -> None:
        val = self.validate()  # the loss, or {"loss": ..., other metrics} (logged as val_<name>)
        metrics = {f"val_{name}": value for name, value in (val if isinstance(val, dict) else {"loss": val}).items()}
        self._log(metrics, step)
        self._write(progress, f"step {step}: validation loss {metrics['val_loss']:.4f}")

    def _step_metrics(self, result: StepResult, seconds: float, seq_len: int, lr: float) -> dict:
        """The logged metrics of a step: the only place the loop reads values back from the device.

        ``tokens_per_s`` and ``mfu`` count every token fed to the model (padding excluded);
        ``target_tokens_per_s`` those that carried a loss. ``lr`` is the learning rate the step trained with.
        """
        target_tokens = int(result.num_target_tokens)
        tokens = int(result.num_tokens) if result.num_tokens is not None else target_tokens
        flops = self.flops_per_token(seq_len) if self.flops_per_token is not None else 0.0
        metrics = {"loss": _scalar(result.loss), "lr": lr, "grad_norm": _scalar(result.grad_norm),
                   "tokens": tokens, "target_tokens": target_tokens,
                   **step_metrics(tokens, seconds, flops, self.device, self.world_size),
                   "target_tokens_per_s": target_tokens / max(seconds, 1e-9)}
        if self.flops_per_token is None:
            metrics.pop("mfu", None)
        metrics.update({name: float(value) for name, value in (result.metrics or {}).items()})
        return metrics

    # ------------------------------------------------------------------ the loop
    def run(self, loader: Iterable[dict], train_step: Callable[[list[dict], int], StepResult],
            lr: Callable[[], float] | None = None) -> None:
        """Train until ``total_steps`` (or a stop request: then save and raise ``SystemExit``).

        ``loader`` yields collated micro-batches (on the CPU or the device) and is iterated once per
        epoch (a :class:`~torchft.data.dataloader.ResumableDataLoader`; a step never mixes two epochs:
        an epoch's last step takes the batches left); ``train_step(micro_batches, step)`` runs one
        optimizer step; ``lr()`` gives the current learning rate (read before a logged step runs,
        since the step advances the schedule).
        """
        if self.is_main_process and hasattr(self.metric_logger, "continue_from"):
            self.metric_logger.continue_from(self.step)  # an earlier run's lines after this step are superseded
        if self.validate is not None and self.step == 0:
            self._validate(0, None)
        progress = ProgressBar(self.total_steps, initial=self.step, disable=not self._show_progress)
        timer = StepTimer(self.device)
        watch = NonFiniteWatch()
        steps = step_micro_batches(loader, self.gradient_accumulation_steps)
        stopping = False
        reset_peak_memory(self.device)
        with StopRequested() as stop:
            try:
                while self.step < self.total_steps:
                    micro_batches = [to_device(b, self.device) for b in next(steps)]
                    self.step += 1
                    step = self.step
                    logging_step = self._every(step, self.log_every)
                    # the LR this step trains with: train_step steps the schedule to the next step's
                    step_lr = lr() if logging_step and lr is not None else float("nan")
                    timer.start()
                    try:
                        result = train_step(micro_batches, step)
                    except torch.OutOfMemoryError as err:
                        raise MemoryError(out_of_memory_message(step, micro_batches[0])) from err
                    timer.stop()
                    watch.update(step, result)  # on the device: no sync

                    if logging_step:  # read back: metrics, then the non-finite check
                        metrics = self._step_metrics(result, timer.seconds(), micro_batches[0]["tokens"].shape[1],
                                                     step_lr)
                        watch.check(self.last_checkpoint)
                        self._log(metrics, step)
                        progress.update(metrics)
                        reset_peak_memory(self.device)  # the next logged peak is that of the steps since this one
                    else:
                        progress.update()
                    if self.validate is not None and (self._is_last(step) or self._every(step, self.eval_every)):
                        self._validate(step, progress)

                    # Checked once per step, after it: a signal during a step saves that step.
                    stopping = self.any_rank(stop.requested is not None)
                    if self._every(step, self.save_every) or self._is_last(step) or stopping:
                        watch.check(self.last_checkpoint)  # never save a step that was not finite
                        self.last_checkpoint = self.save(step)
                        done = "saved" if self.finish_save is None else "saving (in the background)"
                        self._write(progress, f"step {step}: {done} {self.last_checkpoint}")
                    if stopping:
                        break
            except BaseException:
                self._finish_save_after_error()
                raise
            if self.finish_save is not None:
                self.finish_save()  # the last save is complete and in place before the run ends
        progress.close()
        if stopping or stop.requested is not None:  # (a signal during the last save: it was saved)
            self._stop(stop)

    def _finish_save_after_error(self) -> None:
        """An error ends the run: a save still under way completes first (the error names the last
        checkpoint), and its own failure is only logged (the error that ended the run is the one raised)."""
        if self.finish_save is None:
            return
        try:
            self.finish_save()
        except Exception as err:
            if self.is_main_process:
                log.warning("the save under way when the run ended did not complete: %s", err)

    def _stop(self, stop: StopRequested):
        self.metric_logger.close()
        if self.is_main_process:
            log.warning("%s received: saved %s; continue with resume_from_checkpoint=%s",
                        stop.requested or "a stop request on another rank", self.last_checkpoint,
                        self.last_checkpoint)
        # 128 + the signal number, as a shell reports a process ended by it (SIGTERM when another rank got it)
        raise SystemExit(stop.exit_code or 128 + signal.SIGTERM)
