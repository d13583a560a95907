"""The shared training loop: cadences, main-process-only output, stop handling on every rank."""
import itertools
import os
import signal

import pytest
import torch

from torchft.training.loop import TrainingLoop
from torchft.training.metric_logging import MetricLogger
from torchft.training.steps import StepResult


class Recorder(MetricLogger):
    def __init__(self):
        self.lines, self.closed = [], False

    def log(self, metrics, step):
        self.lines.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def batches():
    for i in itertools.count():
        yield {"tokens": torch.full((2, 5), i), "labels": torch.full((2, 5), i)}


def make_loop(logger, saves, **kwargs):
    def save(step):
        saves.append(step)
        return f"out/step_{step}"

    defaults = dict(save_every_n_steps=3, log_every_n_steps=2, eval_every_n_steps=4, progress_bar=False)
    return TrainingLoop(7, save, logger, torch.device("cpu"), **{**defaults, **kwargs})


def fixed_step(micro_batches, step):
    return StepResult(loss=torch.tensor(1.0 / step), num_target_tokens=8 * len(micro_batches),
                      grad_norm=torch.tensor(0.5))


def test_cadences_and_what_is_logged():
    logger, saves, seen = Recorder(), [], []

    def train_step(micro_batches, step):
        seen.append((step, [int(b["tokens"][0, 0]) for b in micro_batches]))
        return fixed_step(micro_batches, step)

    loop = make_loop(logger, saves, gradient_accumulation_steps=2, validate=lambda: 2.5)
    loop.run(batches(), train_step, lr=lambda: 1e-3)
    assert seen[:2] == [(1, [0, 1]), (2, [2, 3])]  # 2 micro-batches per step, in order
    assert saves == [3, 6, 7]  # every 3 steps and the last one
    assert loop.last_checkpoint == "out/step_7"
    assert [s for s, m in logger.lines if "loss" in m] == [2, 4, 6]
    assert [s for s, m in logger.lines if "val_loss" in m] == [0, 4, 7]
    step2 = next(m for s, m in logger.lines if s == 2 and "loss" in m)
    assert step2["loss"] == 0.5 and step2["grad_norm"] == 0.5 and step2["tokens"] == 16 and step2["lr"] == 1e-3
    assert not logger.closed  # the recipe closes it after its own post-training work


def test_resumed_loop_starts_after_its_step_and_skips_step_0_validation():
    logger, saves = Recorder(), []
    loop = make_loop(logger, saves, start_step=5, validate=lambda: 1.0, last_checkpoint="out/step_5")
    loop.run(batches(), fixed_step)
    assert [s for s, m in logger.lines if "loss" in m] == [6]
    assert [s for s, m in logger.lines if "val_loss" in m] == [7]
    assert saves == [6, 7]


def test_only_the_main_process_logs_but_every_rank_saves_and_validates():
    logger, saves, validations = Recorder(), [], []
    loop = make_loop(logger, saves, is_main_process=False, validate=lambda: validations.append(1) or 1.0)
    loop.run(batches(), fixed_step)
    assert logger.lines == [] and saves == [3, 6, 7] and len(validations) == 3  # steps 0, 4, 7


def test_a_stop_on_another_rank_saves_and_exits_on_this_one():
    logger, saves = Recorder(), []
    loop = make_loop(logger, saves, any_rank=lambda local: loop.step == 2)
    with pytest.raises(SystemExit) as stopped:
        loop.run(batches(), fixed_step)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert saves == [2] and logger.closed


def test_sigterm_during_a_step_saves_that_step_then_exits():
    logger, saves = Recorder(), []

    def train_step(micro_batches, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return fixed_step(micro_batches, step)

    loop = make_loop(logger, saves)
    with pytest.raises(SystemExit) as stopped:
        loop.run(batches(), train_step)
    assert stopped.value.code == 128 + signal.SIGTERM and saves == [2]


def test_a_save_finished_in_the_background_completes_before_the_run_ends_however_it_ends(caplog):
    """``finish_save`` (async_save): called after the last save, before a stop names its checkpoint, and when
    an error ends the run (then its own failure is logged, and the error that ended the run is raised)."""
    caplog.set_level("WARNING", logger="torchft")
    finished = []  # (step, warnings logged so far) at each call
    finish = lambda: finished.append((loop.step, len(caplog.records)))

    loop = make_loop(Recorder(), [], finish_save=finish)
    loop.run(batches(), fixed_step)
    assert finished == [(7, 0)]  # once, at the end: each save finishes the one before it itself

    finished.clear()
    loop = make_loop(Recorder(), [], finish_save=finish, any_rank=lambda local: loop.step == 2)
    with pytest.raises(SystemExit):
        loop.run(batches(), fixed_step)
    assert finished == [(2, 0)]  # finished before the stop's message names the folder
    assert "saved out/step_2; continue with resume_from_checkpoint=out/step_2" in caplog.records[-1].getMessage()

    def failing_step(micro_batches, step):
        if step == 5:
            raise ValueError("bad batch")
        return fixed_step(micro_batches, step)

    def failing_finish():
        raise OSError("No space left on device")

    caplog.clear()
    loop = make_loop(Recorder(), [], finish_save=failing_finish)
    with pytest.raises(ValueError, match="bad batch"):
        loop.run(batches(), failing_step)
    assert [r.getMessage() for r in caplog.records] == [
        "the save under way when the run ended did not complete: No space left on device"]


def test_tokens_per_second_and_mfu_count_all_tokens_with_target_tokens_beside(monkeypatch):
    from torchft.training import throughput

    monkeypatch.setattr(throughput, "peak_flops", lambda device: 1e9)
    logger, saves = Recorder(), []

    def step(micro_batches, n):
        return StepResult(torch.tensor(1.0), num_target_tokens=40, grad_norm=torch.tensor(0.5), num_tokens=100)

    loop = make_loop(logger, saves, log_every_n_steps=1, flops_per_token=lambda seq_len: 1e3)
    loop.run(batches(), step)
    m = next(m for s, m in logger.lines if "loss" in m)
    assert m["tokens"] == 100 and m["target_tokens"] == 40
    assert m["tokens_per_s"] / m["target_tokens_per_s"] == pytest.approx(100 / 40)
    assert m["mfu"] == pytest.approx(m["tokens_per_s"] * 1e3 / 1e9)  # every token, not only the targets


def _mfu_over_one_device(**loop_kwargs) -> float:
    """The logged mfu / (the step's global FLOP/s / one device's peak)."""
    logger = Recorder()
    make_loop(logger, [], log_every_n_steps=1, flops_per_token=lambda seq_len: 1e3, **loop_kwargs).run(
        batches(), fixed_step)
    m = next(m for s, m in logger.lines if "loss" in m)
    return m["mfu"] / (m["tokens_per_s"] * 1e3 / 1e9)


def test_mfu_of_a_data_parallel_run_is_per_device(monkeypatch):
    """Tokens of all ranks over the peak of all their devices: 8 ranks at 40% log 0.4, not 3.2."""
    from torchft.training import throughput

    monkeypatch.setattr(throughput, "peak_flops", lambda device: 1e9)
    assert _mfu_over_one_device() == pytest.approx(1.0)  # no process group: one device
    with monkeypatch.context() as m:  # by default the process group's size (the distributed recipes' case)
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_world_size", lambda group=None: 8)
        assert _mfu_over_one_device() == pytest.approx(1 / 8)
    assert _mfu_over_one_device(world_size=8) == pytest.approx(1 / 8)


def test_the_logged_lr_is_the_one_the_step_trained_with():
    from torchft.training.lr_schedule import build_lr_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=3e-3)
    scheduler = build_lr_scheduler(optimizer, "cosine", num_warmup_steps=0, num_training_steps=7)
    used = []

    def train_step(micro_batches, step):  # as optimizer_step: update with the current LR, then the schedule
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        return fixed_step(micro_batches, step)

    logger = Recorder()
    make_loop(logger, [], log_every_n_steps=1).run(batches(), train_step, lr=lambda: optimizer.param_groups[0]["lr"])
    logged = [m["lr"] for s, m in logger.lines if "loss" in m]
    assert logged == used and len(logged) == 7
    assert logged[0] == 3e-3  # no warm-up: the first step trains at the peak
    assert logged[-1] > 0.0  # the last step's LR, not the schedule's end (0), which no step uses


def test_an_epoch_ends_a_step_and_the_next_epoch_starts_a_new_one():
    from torchft.training.steps import step_micro_batches

    steps = step_micro_batches([1, 2, 3, 4, 5], 2)  # a list stands for a loader: each pass is an epoch
    assert [next(steps) for _ in range(4)] == [[1, 2], [3, 4], [5], [1, 2]]
