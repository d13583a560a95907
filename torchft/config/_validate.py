"""Check a config without running anything: ``validate(cfg) -> list of problems`` (empty = OK).

What is checked, all problems collected before returning:

1. every interpolation (``${output_dir}``) resolves and no value is left as ``???``;
2. every ``_component_`` imports;
3. its arguments bind to the component's signature: no unknown argument (with a did-you-mean), and no
   required argument left out, except the ones the recipe passes at call time (see ``RUNTIME_ARGS``);
4. with ``accepted_keys`` (a recipe's top-level keys, see ``torchft.registry``): no unknown top-level key;
5. what the recipe would refuse at its start (``torchft.config._start``): keys the recipe sets itself,
   batch sizes and the run's length, local data files, ``output_dir`` and the resume folder.

Nothing is instantiated, so validating a 70B config costs only the imports. ``checkpoint_problems``
(what ``tune validate`` adds) also looks at the checkpoint the config loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig

from torchft.config._instantiate import check_arguments, import_component, signature_of
from torchft.config._load import COMPONENT_KEY, ConfigError, did_you_mean
from torchft.config._start import runtime_args_for, start_problems, supplied_args


def _walk(node: Any, path: str, owner: str):
    """Yield (path, owner name, node) for every DictConfig/ListConfig and leaf under ``node``."""
    yield path, owner, node
    if isinstance(node, DictConfig):
        for key in node.keys():
            child_path = f"{path}.{key}" if path else str(key)
            yield from _walk(node._get_node(key), child_path, str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _walk(node._get_node(i), f"{path}.{i}" if path else str(i), owner)


def _leaf_problem(node: Any, path: str) -> str | None:
    try:
        resolved = node._dereference_node()
    except Exception as err:
        return f"{path}: cannot resolve {node._value()!r}: {str(err).splitlines()[0]}"
    if resolved is not None and resolved._value() == "???":
        return f"{path}: missing value (the config says ???)"
    return None


def _component_problems(node: DictConfig, path: str, owner: str, runtime: Mapping[str, Iterable[str]]) -> list[str]:
    component_path = f"{path}.{COMPONENT_KEY}" if path else COMPONENT_KEY
    if _leaf_problem(node._get_node(COMPONENT_KEY), component_path):
        return []  # already reported as a leaf problem
    dotted = node[COMPONENT_KEY]
    try:
        fn = import_component(dotted, path)
    except ConfigError as err:
        return [str(err)]
    given = {str(k): None for k in node.keys() if k != COMPONENT_KEY}
    problems = check_arguments(fn, dotted, path, (), given, partial=True)
    if problems:
        return problems
    sig = signature_of(fn)
    if sig is None:
        return []
    supplied = supplied_args(runtime, owner)
    for name, param in sig.parameters.items():
        required = param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        if required and name not in given and name not in supplied:
            problems.append(f"{path or '<config>'}: missing argument '{name}' for {dotted}")
    return problems


def unknown_key_problems(cfg: DictConfig, accepted_keys: Iterable[str]) -> list[str]:
    """One problem per top-level key of ``cfg`` the recipe does not read, with a did-you-mean.

    An empty ``accepted_keys`` means "not known" (a recipe with no shipped config): nothing is reported.
    """
    accepted = sorted(set(accepted_keys))
    if not accepted:
        return []
    unknown = [str(key) for key in cfg.keys() if key not in accepted]
    return [f"{key}: unknown key for this recipe{did_you_mean(key, accepted)}" for key in unknown]


def validate(
    cfg: DictConfig,
    accepted_keys: Iterable[str] | None = None,
    runtime_args: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """Every problem in ``cfg``, one line each; an empty list means the config is valid.

    ``accepted_keys``: the top-level keys the recipe reads; other top-level keys are reported with a
    did-you-mean. The recipe's start checks (``start_problems``) are included. ``runtime_args``: extra ``{key: {argument, ...}}`` the recipe passes at call time,
    added to ``RUNTIME_ARGS``.
    """
    runtime = runtime_args_for(runtime_args)
    problems: list[str] = []
    if accepted_keys is not None:
        problems.extend(unknown_key_problems(cfg, accepted_keys))
    for path, owner, node in _walk(cfg, "", ""):
        if isinstance(node, DictConfig):
            if COMPONENT_KEY in node:
                problems.extend(_component_problems(node, path, owner, runtime))
        elif not isinstance(node, ListConfig):
            problem = _leaf_problem(node, path)
            if problem:
                problems.append(problem)
    return problems + start_problems(cfg, runtime_args)


def checkpoint_problems(cfg: DictConfig, *, compare_model: bool = True) -> list[str]:
    """Problems with the checkpoint a fine-tuning config loads (none when it has no ``checkpointer``).

    ``checkpointer.checkpoint_dir`` must exist and hold its config (``config.json`` / ``params.json``)
    and every weight file, and the model ``cfg.model`` builds must have the checkpoint's architecture.
    The model is built on ``meta`` and the checkpoint's shapes come from its config: no weight is read.
    ``compare_model=False`` checks the folder only.
    """
    import torch

    from torchft.config._instantiate import instantiate
    from torchft.training.setup import check_same_architecture

    node = cfg.get("checkpointer") if isinstance(cfg, DictConfig) else None
    if not isinstance(node, DictConfig) or COMPONENT_KEY not in node or "checkpoint_dir" not in node:
        return []
    try:
        checkpoint_dir = node.checkpoint_dir
    except Exception:
        return []  # an interpolation that does not resolve: reported by validate()
    if checkpoint_dir is None:
        return []
    where = "checkpointer.checkpoint_dir"
    if not Path(checkpoint_dir).is_dir():
        if cfg.get("base_model") is not None:
            return []  # the quickstart's base_model node writes this folder when the run starts
        from torchft.checkpoint._io import download_hint

        return [f"{where} ({checkpoint_dir}): folder does not exist ({download_hint(checkpoint_dir)})"]
    try:
        checkpointer = instantiate(node)
        checkpointer.check_weight_files()
        checkpoint_args = checkpointer.model_args
    except Exception as err:  # the checkpoint's own errors name the file and the rule
        return [f"{where}: {err}"]
    if not compare_model or not isinstance(cfg.get("model"), DictConfig) or COMPONENT_KEY not in cfg.model:
        return []
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model)
    except Exception as err:
        return [f"model: cannot build it on the meta device to compare with the checkpoint ({err})"]
    try:
        check_same_architecture(model.args, checkpoint_args, checkpoint_dir)
    except ValueError as err:
        return [str(err)]
    return []
