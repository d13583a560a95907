"""Load a YAML config by shipped name or path, and apply command-line overrides.

Override grammar (one string each, as typed after ``--config NAME`` on the command line):

    key=value            set an existing key (dotted for nested keys: ``optimizer.lr=1e-4``;
                         list indices too: ``tasks.0=arc_easy``); the value is parsed as YAML, so
                         ``tasks=[arc_easy,hellaswag]``, ``compile=true``, ``seed=null`` work
    +key=value           add a key the config lacks (``+optimizer.weight_decay=0.01``)
    ~key                 remove a key
    node=pkg.mod.fn      when ``node`` holds a ``_component_``: swap the component, keep its arguments
                         (same as ``node._component_=pkg.mod.fn``)

Setting or removing a key that does not exist is refused with a did-you-mean, so a typo never
silently does nothing.
"""
from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

COMPONENT_KEY = "_component_"


class ConfigError(ValueError):
    """A config or an override is wrong; the message is one line naming the key and the rule."""


def shipped_configs_dir() -> Path:
    """Folder holding the configs shipped inside the installed package (``torchft._recipes/configs``)."""
    return Path(str(importlib.resources.files("torchft._recipes") / "configs"))


def shipped_config_names() -> list[str]:
    """Every shipped config name: ``<family>/<file stem>`` or ``<file stem>`` for top-level files."""
    root = shipped_configs_dir()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or ``" (did you mean one of 'x', 'y'?)"`` or ``""``."""
    matches = close_matches(word, candidates)
    if not matches:
        return ""
    if len(matches) == 1:
        return f" (did you mean '{matches[0]}'?)"
    return " (did you mean one of " + ", ".join(f"'{m}'" for m in matches) + "?)"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A local YAML file if one exists at that path, else the shipped config of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or text.startswith((".", "/", "~"))
    if not text.startswith((".", "/", "~")):
        # a shipped name, also when written with its suffix: llama3_2/1B_lora_single_device(.yaml)
        stem = text[: -len(".yaml")] if text.endswith(".yaml") else text
        shipped = shipped_configs_dir() / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
    if looks_like_path:
        raise FileNotFoundError(f"config file {text} does not exist (check the path, or give a shipped config "
                                "name: `tune ls` lists them)")
    names = shipped_config_names()
    hint = did_you_mean(text, names) or " (see `tune ls` for the shipped configs)"
    raise FileNotFoundError(f"no config named '{text}' and no file at that path{hint}")


def load_yaml(path: str | Path) -> DictConfig:
    """Parse one YAML file; a syntax error reads ``file:line: invalid YAML: <problem>``."""
    path = Path(path)
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got a list")
    return cfg


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a config by shipped name (``llama3_2/1B_lora_single_device``) or YAML path, then apply overrides.

    Interpolations such as ``${output_dir}`` stay live: they resolve when read.
    """
    cfg = load_yaml(resolve_config_path(name_or_path))
    apply_overrides(cfg, overrides)
    return cfg


# --- overrides -----------------------------------------------------------------------------------


def all_key_paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key path in a config, nested ones included (``optimizer``, ``optimizer.lr``...)."""
    paths = []
    if isinstance(node, DictConfig):
        items = [(str(k), node._get_node(k)) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(str(i), node._get_node(i)) for i in range(len(node))]
    else:
        return paths
    for key, child in items:
        path = f"{prefix}.{key}" if prefix else key
        paths.append(path)
        if isinstance(child, (DictConfig, ListConfig)):
            paths.extend(all_key_paths(child, path))
    return paths


def _is_literal_text(text: str) -> bool:
    """Text YAML would rewrite rather than read as one value: several lines (YAML folds a blank line
    into one newline and a newline into a space), ``key: value`` (a mapping), `` #`` (a comment).
    Typed on a command line, such a value (a prompt, usually) means exactly the characters given."""
    stripped = text.strip()
    if stripped[:1] in ("[", "{", "'", '"'):
        return False  # a YAML list, mapping or quoted string, written on purpose
    return "\n" in text or ": " in text or stripped.endswith(":") or " #" in text


def _parse_value(text: str) -> Any:
    """Parse an override value the way OmegaConf parses YAML (``1e-4`` is a float, ``[a,b]`` a list);
    plain text YAML would rewrite (see ``_is_literal_text``) stays as typed."""
    if _is_literal_text(text):
        return text
    value = OmegaConf.from_dotlist([f"v={text}"])._get_node("v")
    if isinstance(value, (DictConfig, ListConfig)):
        return value
    return value._value()


def _child(node: Any, key: str) -> Any:
    """The child at ``key`` or a KeyError; list indices are integers."""
    if isinstance(node, DictConfig):
        if key not in node:
            raise KeyError(key)
        return node._get_node(key)
    if isinstance(node, ListConfig):
        if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
            raise KeyError(key)
        return node._get_node(int(key))
    raise KeyError(key)


def _parent_and_key(cfg: DictConfig, dotted: str, *, create_parents: bool) -> tuple[Any, str]:
    """Walk to the node holding the last part of ``dotted``; missing parents raise KeyError (or are made)."""
    parts = dotted.split(".")
    node: Any = cfg
    for part in parts[:-1]:
        try:
            child = _child(node, part)
        except KeyError:
            if not (create_parents and isinstance(node, DictConfig)):
                raise
            child = None
        if (child is None or child._is_none()) and create_parents and isinstance(node, DictConfig):
            # Missing, or null in the YAML (`validation_dataset: null`): `+a.b=v` makes `a` a mapping.
            node[part] = {}
            child = node._get_node(part)
        node = child
    return node, parts[-1]


def _missing_key_error(cfg: DictConfig, dotted: str, action: str, add_hint: bool) -> ConfigError:
    # Suggest keys at the same depth: `optimizer.lrr` -> `optimizer.lr`, not `optimizer`.
    depth = dotted.count(".")
    hint = did_you_mean(dotted, [p for p in all_key_paths(cfg) if p.count(".") == depth])
    add = f"; use +{dotted}=VALUE to add it" if add_hint else ""
    return ConfigError(f"cannot {action} '{dotted}': the config has no such key{hint}{add}")


def apply_override(cfg: DictConfig, override: str) -> None:
    """Apply one ``key=value`` / ``+key=value`` / ``~key`` override in place (see the module docstring)."""
    text = override.strip()
    if text.startswith("~"):
        dotted = text[1:]
        try:
            parent, key = _parent_and_key(cfg, dotted, create_parents=False)
            _child(parent, key)
        except KeyError:
            raise _missing_key_error(cfg, dotted, "remove", add_hint=False) from None
        if isinstance(parent, ListConfig):
            del parent[int(key)]
        else:
            del parent[key]
        return
    if "=" not in text or text.startswith("=") or text.lstrip("+").startswith("="):
        raise ConfigError(f"override '{override}' must look like key=value, +key=value or ~key")
    dotted, raw = text.split("=", 1)
    adding = dotted.startswith("+")
    dotted = dotted.lstrip("+")
    value = _parse_value(raw)
    if adding:
        try:
            parent, key = _parent_and_key(cfg, dotted, create_parents=True)
        except KeyError:
            raise ConfigError(f"cannot add '{dotted}': its parent is not a mapping") from None
        if isinstance(parent, DictConfig) and key in parent:
            raise ConfigError(f"cannot add '{dotted}': the config already has it; use {dotted}=VALUE to change it")
        if not isinstance(parent, DictConfig):
            raise ConfigError(f"cannot add '{dotted}': its parent is not a mapping")
        parent[key] = value
        return
    try:
        parent, key = _parent_and_key(cfg, dotted, create_parents=False)
        current = _child(parent, key)
    except KeyError:
        raise _missing_key_error(cfg, dotted, "set", add_hint=True) from None
    if isinstance(current, DictConfig) and COMPONENT_KEY in current and isinstance(value, str):
        # `model=torchft.models.llama3_2.lora_llama3_2_3b`: swap the builder, keep its arguments.
        current[COMPONENT_KEY] = value
        return
    if isinstance(parent, ListConfig):
        parent[int(key)] = value
    else:
        parent[key] = value


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply every override in order, in place; returns ``cfg`` for convenience."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of strings such as ['optimizer.lr=1e-4'], not one string")
    for override in overrides:
        apply_override(cfg, override)
    return cfg
