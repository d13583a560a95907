"""Run lm-eval tasks on a torchft model: task lookup with clear errors, the adapter check, and a
metrics-only hook that training recipes can call at the end or every N steps."""
from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from torchft.eval._lm import TorchFTEvalWrapper
from torchft.training.rng import get_rng_state, set_rng_state


class TaskDataUnavailableError(ConnectionError):
    """A task's dataset has to come from the network, which cannot be reached (or offline mode is on)."""


def task_manager_for(
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
):
    """An lm-eval ``TaskManager`` that knows ``tasks`` (checked: unknown names raise ``ValueError``).

    Cheap next to loading a model, so recipes call it first and pass it to :func:`evaluate`.
    """
    manager = _task_manager(include_path, include_defaults)
    check_tasks(manager, list(tasks))
    return manager


def _task_manager(include_path: str | Path | Sequence[str | Path] | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"include_path {p} does not exist")
    return TaskManager(include_path=paths, include_defaults=include_defaults, verbosity="ERROR")


def check_tasks(task_manager, tasks: Sequence[str]) -> None:
    """Raise ``ValueError`` naming each unknown task and the closest known names."""
    if not tasks:
        raise ValueError("tasks is empty: name at least one lm-eval task")
    known = task_manager.all_tasks
    problems = []
    for task in tasks:
        if task in known:
            continue
        close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "no close name; `lm-eval ls tasks` lists all"
        problems.append(f"unknown lm-eval task '{task}' ({hint})")
    if problems:
        raise ValueError("; ".join(problems))


def _is_network_error(err: BaseException) -> bool:
    """True for the ways datasets / huggingface_hub say the Hub could not be reached."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        text = str(err)
        if isinstance(err, ConnectionError) or name in {
            "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout", "ConnectError",
        } or "offline" in text.lower() or "Couldn't reach" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def check_adapter_is_active(model: nn.Module, probe_tokens: torch.Tensor) -> None:
    """Fail when a model that carries adapters gives exactly the base model's logits.

    An adapter that was never loaded (or loaded under the wrong names) leaves ``lora_b`` at its zero
    initialisation, and the evaluation would silently score the base model. Models without adapters pass.

    Args:
        probe_tokens: [1, s] token ids to run through the model with and without the adapter.
    """
    from torchft.modules.peft import disable_adapter

    if not any("lora_" in name or name.endswith("magnitude") for name, _ in model.named_parameters()):
        return
    was_training = model.training
    model.eval()
    with torch.no_grad():
        tuned = model(probe_tokens)
        with disable_adapter(model):
            base = model(probe_tokens)
    model.train(was_training)
    if torch.equal(tuned, base):
        raise ValueError(
            "adapter has no effect: the model's logits with the adapter equal the base model's on a probe input "
            "(were the adapter weights loaded? lora_b is still all zeros); refusing to evaluate the base model "
            "as if it were the fine-tuned one"
        )


def _git_commit_quietly() -> str | None:
    """lm-eval's record of the current folder's git commit, without git's ``fatal: not a git repository``
    on stderr when the folder is not a repository (a plain install run from anywhere)."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)
        return out.stdout.decode().strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def _quiet_git_probe():
    import lm_eval.evaluator

    probe = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    if probe is not None:
        lm_eval.evaluator.get_git_commit_hash = _git_commit_quietly
    try:
        yield
    finally:
        if probe is not None:
            lm_eval.evaluator.get_git_commit_hash = probe


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    max_gen_toks: int = 256,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    log_samples: bool = False,
    check_adapter: bool = True,
    seed: int = 1234,
    task_manager=None,
    add_bos: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks`` and return lm-eval's results dict.

    Args:
        tasks: task (or group) names, e.g. ``["hellaswag"]`` or a local task from ``include_path``.
        limit: examples per task (an int), or a fraction of each task (a float < 1).
        num_fewshot: few-shot examples in each prompt (task default when None).
        include_path: folder(s) of extra task YAML files.
        include_defaults: also index lm-eval's bundled tasks (turn off to start faster with local tasks).
        log_samples: keep per-example inputs and outputs under ``results["samples"]``.
        check_adapter: run :func:`check_adapter_is_active` first.
        task_manager: one from :func:`task_manager_for` (then include_path/include_defaults are not used).
        add_bos: BOS in front of every scored string: None follows the model's tokenizer, True/False force it.

    The global RNGs (``random``, numpy, torch on every device) are left as they were: lm-eval seeds
    them for its own sampling, and a training loop that evaluates every N steps must not be reseeded.
    """
    from lm_eval import simple_evaluate

    tasks = list(tasks)
    if task_manager is None:
        task_manager = task_manager_for(tasks, include_path, include_defaults)
    lm = TorchFTEvalWrapper(model, tokenizer, max_seq_len=max_seq_len, batch_size=batch_size,
                            max_gen_toks=max_gen_toks, add_bos=add_bos)
    if check_adapter:
        probe = lm.tok_encode("The quick brown fox jumps over the lazy dog.")[: lm.max_length]
        check_adapter_is_active(model, torch.tensor([probe], device=lm.device))
    was_training = model.training
    rng_state = get_rng_state()  # simple_evaluate reseeds python, numpy and torch
    try:
        with _quiet_git_probe():
            results = simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                log_samples=log_samples, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except Exception as err:
        if _is_network_error(err):
            offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
            why = f"{' and '.join(offline)} is set" if offline else "the Hugging Face Hub cannot be reached"
            raise TaskDataUnavailableError(
                f"tasks {tasks}: the task data must be downloaded but {why}; download it once online "
                f"(it is then cached) or point the task at local files (dataset_path: json, dataset_kwargs.data_files)"
            ) from err
        raise
    finally:
        set_rng_state(rng_state)
        model.train(was_training)
    return results


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` from an lm-eval results dict (stderr, alias and sample counts dropped)."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metrics[f"{task}/{key.split(',')[0]}"] = float(value)
    return metrics


def eval_hook(
    model: nn.Module,
    tokenizer: Any,
    tasks: Iterable[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    max_seq_len: int | None = None,
    task_manager=None,
) -> dict[str, float]:
    """Evaluation for a training loop: score ``model`` as it is now and return flat metrics.

    Call it at the end of training or every N steps and hand the dict to a metric logger, e.g.
    ``logger.log_dict(eval_hook(model, tokenizer, ["tiny_mc"], limit=50), step)``. The model's
    train/eval mode is restored afterwards; gradients are not touched. To skip re-indexing lm-eval's
    tasks on every call, build ``task_manager_for(tasks, include_path)`` once and pass it.
    """
    results = evaluate(
        model, tokenizer, list(tasks), limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
        include_path=include_path, include_defaults=include_defaults, max_seq_len=max_seq_len,
        check_adapter=False, task_manager=task_manager,
    )
    return flatten_metrics(results)
