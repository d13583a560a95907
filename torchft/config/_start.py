"""What a recipe refuses when it starts, found from the config and the file system before any work.

``start_problems(cfg)`` lists every such problem (``validate`` and ``tune validate`` report them with
the others); ``check_start(cfg)``, the first line of every recipe's ``main``, raises them as one line.
The checks only look: nothing is loaded, created or deleted, so a refused run leaves nothing behind.
Each check runs when the config has its key:

- an argument the recipe passes itself (``RUNTIME_ARGS``) set in the config: the recipe's value would
  silently replace it, so the key is refused (``lr_scheduler.num_training_steps is set by the recipe
  from max_steps/epochs; remove it``);
- ``batch_size`` and ``gradient_accumulation_steps`` are positive integers; ``max_steps`` (a positive
  integer) or ``epochs`` (a number > 0) is set; ``optimizer_in_backward=true`` needs
  ``gradient_accumulation_steps=1`` and ``clip_grad_norm=null``; ``async_save`` is true or false;
- a dataset (``dataset``, ``*_dataset``) read from local files has its ``data_files``, and they exist;
- ``output_dir`` can be written; a fresh run (``resume_from_checkpoint: null``) refuses an
  ``output_dir`` holding step folders unless ``overwrite_output_dir=true``; a resumed run's folder exists.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from torchft.config._instantiate import import_component, signature_of
from torchft.config._load import COMPONENT_KEY, ConfigError

# Arguments a recipe supplies itself when it instantiates the node under that key, so a config does
# not (and must not) list them: ``instantiate(cfg.optimizer, model.parameters())``. The key is the node's
# own name, or for a node inside a list the name of the list (``dataset: [{_component_: ...}, ...]``).
# A key ending in ``_dataset`` (``validation_dataset``) is treated like ``dataset``. A recipe with other
# call-time arguments declares them in its registry entry (``Recipe.runtime_args``).
RUNTIME_ARGS: Mapping[str, frozenset[str]] = {
    "optimizer": frozenset({"params"}),
    "lr_scheduler": frozenset({"optimizer", "num_training_steps"}),
    "dataset": frozenset({"tokenizer"}),
    "collate_fn": frozenset({"batch"}),
    "loss": frozenset({"compile"}),
}

# Where the recipe takes each of those arguments from, for the message that refuses a config's value.
_SET_FROM = {
    "params": "(the parameters it trains)",
    "optimizer": "(the optimizer it builds)",
    "num_training_steps": "from max_steps/epochs",
    "tokenizer": "(the one the tokenizer node builds)",
    "compile": "from the top-level compile",
    "batch": "(each batch)",
}

_UNREADABLE = object()  # a value that does not resolve: validate() reports it, the checks skip it


def runtime_args_for(extra: Mapping[str, Iterable[str]] | None = None) -> dict[str, set[str]]:
    """``RUNTIME_ARGS`` with a recipe's own call-time arguments added."""
    runtime = {key: set(names) for key, names in RUNTIME_ARGS.items()}
    for key, names in (extra or {}).items():
        runtime.setdefault(key, set()).update(names)
    return runtime


def supplied_args(runtime: Mapping[str, Iterable[str]], key: str) -> set[str]:
    """The arguments the recipe passes to the node under top-level ``key``."""
    supplied = set(runtime.get(key, ()))
    if key.endswith("_dataset"):
        supplied |= set(runtime.get("dataset", ()))
    return supplied


def _read(node: DictConfig, key: str) -> Any:
    """``node[key]`` resolved, or ``_UNREADABLE`` when it does not resolve (or is ``???``)."""
    try:
        return node[key]
    except Exception:
        return _UNREADABLE


def _component_nodes(cfg: DictConfig, key: str) -> list[tuple[str, DictConfig]]:
    """``(path, node)`` of each ``_component_`` node under top-level ``key`` (itself, or a list's items)."""
    value = _read(cfg, key)
    if isinstance(value, DictConfig):
        items = [(key, value)]
    elif isinstance(value, ListConfig):
        items = [(f"{key}.{i}", _read(value, i)) for i in range(len(value))]
    else:
        return []
    return [(path, node) for path, node in items if isinstance(node, DictConfig) and COMPONENT_KEY in node]


def recipe_set_problems(cfg: DictConfig, runtime: Mapping[str, Iterable[str]]) -> list[str]:
    """Config keys the recipe would silently replace with its own value: one problem each."""
    problems = []
    for key in map(str, cfg.keys()):
        supplied = supplied_args(runtime, key)
        if not supplied:
            continue
        for path, node in _component_nodes(cfg, key):
            for arg in sorted(supplied & set(map(str, node.keys()))):
                why = _SET_FROM.get(arg, "")
                problems.append(f"{path}.{arg} is set by the recipe{' ' + why if why else ''}; remove it")
    return problems


def setting_problems(cfg: DictConfig) -> list[str]:
    """Batch sizes, the run's length and ``optimizer_in_backward``, by the rules the recipe applies."""
    from torchft.training.setup import positive_int_problem, run_length_problems

    read = {key: _read(cfg, key) for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "epochs",
                                             "optimizer_in_backward", "clip_grad_norm", "async_save") if key in cfg}
    problems = [positive_int_problem(key, read[key]) for key in ("batch_size", "gradient_accumulation_steps")
                if key in read and read[key] is not _UNREADABLE]
    length = (read.get("max_steps"), read.get("epochs"))
    if ("max_steps" in read or "epochs" in read) and _UNREADABLE not in length:
        problems.extend(run_length_problems(*length))
    if read.get("optimizer_in_backward") is True and (read.get("gradient_accumulation_steps", 1) != 1
                                                      or read.get("clip_grad_norm") is not None):
        problems.append("optimizer_in_backward=true needs gradient_accumulation_steps=1 and clip_grad_norm=null "
                        "(each weight is updated before the other gradients exist)")
    async_save = read.get("async_save", False)
    if async_save is not _UNREADABLE and not isinstance(async_save, bool):
        problems.append(f"async_save ({async_save}) must be true or false")
    return [problem for problem in problems if problem]


def _argument(node: DictConfig, name: str, default: Any) -> Any:
    value = _read(node, name) if name in node else default
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def dataset_problems(cfg: DictConfig) -> list[str]:
    """Datasets read from local files: ``data_files`` set, every file present (nothing is read)."""
    problems = []
    for key in map(str, cfg.keys()):
        if key != "dataset" and not key.endswith("_dataset"):
            continue
        for path, node in _component_nodes(cfg, key):
            try:
                fn = import_component(node[COMPONENT_KEY], path)
            except Exception:
                continue  # validate() reports it
            sig = signature_of(fn)
            if sig is None or not {"source", "data_files"} <= set(sig.parameters):
                continue
            source = _argument(node, "source", sig.parameters["source"].default)
            data_files = _argument(node, "data_files", sig.parameters["data_files"].default)
            problem = _source_problem(fn, source, data_files)
            if problem:
                problems.append(f"{path}: {problem}")
    return problems


def _source_problem(fn, source: Any, data_files: Any) -> str | None:
    from torchft.data.datasets import SOURCE_READERS
    from torchft.data.sources import local_source

    if _UNREADABLE in (source, data_files) or not isinstance(source, str):
        return None
    if data_files is None and fn not in SOURCE_READERS:
        return None  # a builder with data of its own (the quickstart's shipped tasks)
    try:
        local_source(source, data_files)
    except (ValueError, OSError) as err:
        return str(err)
    return None


def output_dir_problems(cfg: DictConfig) -> list[str]:
    """``output_dir`` writable; a fresh run does not mix with an earlier one's step folders."""
    from torchft.checkpoint import resolve_resume_dir
    from torchft.training.setup import fresh_output_dir_problem, output_dir_problem

    output_dir = _read(cfg, "output_dir") if "output_dir" in cfg else None
    if output_dir is None or output_dir is _UNREADABLE:
        return []
    problem = output_dir_problem(output_dir)
    if problem or "resume_from_checkpoint" not in cfg:
        return [problem] if problem else []
    resume = _read(cfg, "resume_from_checkpoint")
    if resume is _UNREADABLE:
        return []
    if resume in (None, False, ""):
        overwrite = cfg.get("overwrite_output_dir", False) is True
        problem = fresh_output_dir_problem(output_dir, resuming=False, overwrite=overwrite)
        return [problem] if problem else []
    try:
        resolve_resume_dir(resume, output_dir)
    except (ValueError, OSError) as err:
        return [f"resume_from_checkpoint ({resume}): {err}"]
    return []


def start_problems(cfg: DictConfig, runtime_args: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Everything a recipe would refuse at its start (see the module docstring), one line each.

    ``runtime_args``: a recipe's own call-time arguments, added to ``RUNTIME_ARGS``.
    """
    return (recipe_set_problems(cfg, runtime_args_for(runtime_args)) + setting_problems(cfg)
            + dataset_problems(cfg) + output_dir_problems(cfg))


def check_start(cfg: DictConfig, runtime_args: Mapping[str, Iterable[str]] | None = None) -> None:
    """Raise ConfigError listing every ``start_problems`` on one line; the first call of a recipe's ``main``."""
    problems = start_problems(cfg, runtime_args)
    if problems:
        raise ConfigError("; ".join(problems))
