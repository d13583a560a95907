"""Turn config nodes holding ``_component_: dotted.path`` into objects.

    optimizer:
      _component_: torch.optim.AdamW
      lr: 2e-5

``instantiate(cfg.optimizer, model.parameters())`` imports ``torch.optim.AdamW`` and calls it with the
caller's arguments merged over the config's. Nested nodes with a ``_component_`` are built first, so a
dataset node can hold a ``_component_`` for its transform. Errors name the config key path.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from torchft.config._load import COMPONENT_KEY, ConfigError, did_you_mean


def node_path(node: Any) -> str:
    """Dotted key path of an OmegaConf node inside its root config (``dataset``, ``datasets.1``)."""
    parts = []
    while node is not None and node._get_parent() is not None:
        parts.append(str(node._key()))
        node = node._get_parent()
    return ".".join(reversed(parts))


def _label(path: str) -> str:
    return path or "<config>"


def import_component(dotted: str, key_path: str = "") -> Callable[..., Any]:
    """Import ``pkg.module.attr`` (attributes may nest: ``pkg.Class.method``)."""
    where = f"{_label(key_path)}.{COMPONENT_KEY}" if key_path else COMPONENT_KEY
    if not isinstance(dotted, str) or not dotted or " " in dotted:
        raise ConfigError(f"{where}: expected a dotted import path such as torch.optim.AdamW, got {dotted!r}")
    parts = dotted.split(".")
    module, n_module_parts = None, 0
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(module_name)
            n_module_parts = i
            break
        except ModuleNotFoundError as err:
            # Only "this very module does not exist" means: try a shorter prefix. A module that exists
            # but fails to import one of its own dependencies is reported as such.
            missing = err.name
            missing_itself = missing is not None and (module_name == missing or module_name.startswith(missing + "."))
            if not missing_itself:
                raise ConfigError(f"{where}: cannot import '{dotted}': {err}") from None
        except Exception as err:  # an error raised while executing the module's code
            reason = f"{type(err).__name__} while importing: {err}"
            raise ConfigError(f"{where}: cannot import '{dotted}': {reason}") from None
    if module is None:
        raise ConfigError(f"{where}: cannot import '{dotted}': no module named '{parts[0]}'")
    obj: Any = module
    for depth in range(n_module_parts, len(parts)):
        attr = parts[depth]
        if not hasattr(obj, attr):
            owner = ".".join(parts[:depth])
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = did_you_mean(attr, names)
            kind = "module" if inspect.ismodule(obj) else "object"
            raise ConfigError(f"{where}: cannot import '{dotted}': {kind} '{owner}' has no attribute '{attr}'{hint}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"{where}: '{dotted}' is not callable")
    return obj


def signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The call signature, or None for builtins that hide it (then arguments are not checked)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _accepts_var_kwargs(sig: inspect.Signature) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def check_arguments(
    fn: Callable[..., Any], dotted: str, key_path: str, args: tuple, kwargs: dict, *, partial: bool = False
) -> list[str]:
    """Problems binding ``args``/``kwargs`` to ``fn``'s signature, one line each (empty when they bind).

    ``partial=True`` only reports unexpected arguments (used by ``validate``, where the recipe supplies
    some arguments at call time).
    """
    sig = signature_of(fn)
    if sig is None:
        return []
    problems = []
    params = sig.parameters
    if not _accepts_var_kwargs(sig):
        named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
        for name in kwargs:
            if name not in named:
                problems.append(
                    f"{_label(key_path)}: unexpected argument '{name}' for {dotted}{did_you_mean(name, named)}"
                )
    if problems:
        return problems
    try:
        (sig.bind_partial if partial else sig.bind)(*args, **kwargs)
    except TypeError as err:
        message = str(err)
        if message.startswith("missing a required argument: "):
            name = message.split(": ", 1)[1]
            message = f"missing argument {name}"
        problems.append(f"{_label(key_path)}: {message} for {dotted}")
    return problems


def _build(value: Any, path: str) -> Any:
    """Recursively instantiate component nodes inside a value; plain values become Python containers."""
    if isinstance(value, DictConfig):
        if COMPONENT_KEY in value:
            return _instantiate_node(value, path, (), {})
        return {str(k): _build(value._get_node(k), f"{path}.{k}" if path else str(k)) for k in value.keys()}
    if isinstance(value, ListConfig):
        return [_build(value._get_node(i), f"{path}.{i}" if path else str(i)) for i in range(len(value))]
    if hasattr(value, "_value"):  # an OmegaConf value node: resolve interpolations
        resolved = _dereference(value, path)
        if isinstance(resolved, (DictConfig, ListConfig)):  # `inner: ${dataset}` points at a whole node
            return _build(resolved, path)
        return _resolve_leaf(value, path)
    return value


def _dereference(node: Any, path: str) -> Any:
    try:
        return node._dereference_node()
    except Exception as err:
        raise ConfigError(f"{_label(path)}: cannot resolve {node._value()!r}: {str(err).splitlines()[0]}") from None


def _resolve_leaf(node: Any, path: str) -> Any:
    resolved = _dereference(node, path)
    value = resolved._value() if resolved is not None else None
    if value == "???":
        raise ConfigError(f"{_label(path)}: missing value (the config says ???); set it with {path}=VALUE")
    return value


def _instantiate_node(node: DictConfig, path: str, args: tuple, kwargs: dict) -> Any:
    dotted = _resolve_leaf(node._get_node(COMPONENT_KEY), f"{path}.{COMPONENT_KEY}" if path else COMPONENT_KEY)
    fn = import_component(dotted, path)
    config_kwargs = {
        str(k): _build(node._get_node(k), f"{path}.{k}" if path else str(k)) for k in node.keys() if k != COMPONENT_KEY
    }
    merged = {**config_kwargs, **kwargs}  # the caller's arguments win over the config's
    problems = check_arguments(fn, dotted, path, args, merged)
    if problems:
        raise ConfigError(problems[0])
    return fn(*args, **merged)


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a config node describes: ``instantiate(cfg.optimizer, model.parameters())``.

    ``node`` is a DictConfig (or plain dict) with a ``_component_`` key; its other keys are keyword
    arguments (nested ``_component_`` nodes are instantiated first, interpolations resolved), the
    caller's positional ``args`` come first and the caller's ``kwargs`` override the config's.
    ``node`` may be None, then None is returned (an optional component left out of the config).
    """
    if node is None:
        return None
    if isinstance(node, dict):
        node = OmegaConf.create(node)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"instantiate expects a config node with a {COMPONENT_KEY} key, got {type(node).__name__}")
    path = node_path(node)
    if COMPONENT_KEY not in node:
        raise ConfigError(f"{_label(path)}: has no {COMPONENT_KEY} key, so there is nothing to instantiate")
    return _instantiate_node(node, path, args, kwargs)
