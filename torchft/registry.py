"""The recipes ``tune`` knows by name, and the shipped configs each one runs with.

An explicit list, kept honest by tests/cli/test_registry.py: every script listed here exists, every
config listed here exists and passes ``tune validate``, and every YAML under recipes/configs is listed
under some recipe. To add a recipe: drop ``recipes/<name>.py`` (defining ``main(cfg)``, see
torchft.config) and its YAMLs under ``recipes/configs/<family>/``, then add a ``Recipe`` below.

Paths are relative to the package ``torchft._recipes`` (the source tree's ``recipes/`` folder), so an
installed wheel finds them too. Importing this module never imports torch.
"""
from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from torchft.config._load import did_you_mean, load_yaml


@dataclass(frozen=True)
class Config:
    """A shipped config: ``name`` is ``<family>/<file stem>`` (or the stem for a top-level file)."""

    name: str
    file_path: str  # relative to torchft._recipes, e.g. "configs/llama3_2/1B_lora_single_device.yaml"

    @property
    def path(self) -> Path:
        return _recipes_root() / self.file_path


@dataclass(frozen=True)
class Recipe:
    """A recipe script and the configs it ships with.

    ``config_keys``: the top-level keys the recipe reads; when empty, the union of the top-level keys of
    its shipped configs is used (so a key every shipped config lacks is reported as unknown).
    ``optional_keys``: keys the recipe also reads, which no shipped config needs to carry (``qat``).
    ``runtime_args``: ``{config key: (argument, ...)}`` the script passes itself when instantiating
    that node, on top of ``torchft.config.RUNTIME_ARGS``; ``tune validate`` then does not ask for them.
    """

    name: str
    file_path: str  # relative to torchft._recipes, e.g. "lora_finetune_single_device.py"
    supports_distributed: bool
    configs: tuple[Config, ...] = ()
    config_keys: tuple[str, ...] = ()
    optional_keys: tuple[str, ...] = ()  # read when present, though a shipped config may leave them out
    runtime_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return _recipes_root() / self.file_path


def _recipes_root() -> Path:
    return Path(str(importlib.resources.files("torchft._recipes")))


def _configs(*names: str) -> tuple[Config, ...]:
    return tuple(Config(name, f"configs/{name}.yaml") for name in names)


RECIPES: list[Recipe] = [
    Recipe(
        name="full_finetune_single_device",
        file_path="full_finetune_single_device.py",
        optional_keys=("qat",),  # quantization-aware training (torchft.training.qat)
        supports_distributed=False,
        configs=_configs(
            "quickstart/full_single_device",
            "llama2/7B_full_single_device",
            "llama3/8B_full_single_device",
            "llama3_1/8B_full_single_device",
            "llama3_2/1B_full_single_device",
            "llama3_2/3B_full_single_device",
        ),
    ),
    Recipe(
        name="lora_finetune_single_device",
        file_path="lora_finetune_single_device.py",
        optional_keys=("qat",),  # quantization-aware training (torchft.training.qat)
        supports_distributed=False,
        configs=_configs(
            "quickstart/lora_single_device",
            "llama2/7B_lora_single_device",
            "llama2/7B_qlora_single_device",
            "llama3/8B_lora_single_device",
            "llama3/8B_qlora_single_device",
            "llama3_1/8B_lora_single_device",
            "llama3_1/8B_qlora_single_device",
            "llama3_1/8B_qlora_long_context_single_device",
            "llama3_2/1B_lora_single_device",
            "llama3_2/1B_qlora_single_device",
            "llama3_2/3B_lora_single_device",
            "llama3_2/3B_qlora_single_device",
            "quickstart/qat_lora_single_device",  # quantization-aware training: the configs' qat: section
            "llama3_1/8B_qat_lora_single_device",
            "llama3_2/1B_qat_lora_single_device",
            "smollm2/135M_lora_single_device",
        ),
    ),
    Recipe(
        name="full_finetune_distributed",
        file_path="full_finetune_distributed.py",
        optional_keys=("qat",),  # quantization-aware training (torchft.training.qat)
        supports_distributed=True,
        configs=_configs(
            "quickstart/full_distributed",
            "llama2/7B_full",
            "llama2/13B_full",
            "llama2/70B_full",
            "llama3/8B_full",
            "llama3/70B_full",
            "llama3_1/8B_full",
            "llama3_1/70B_full",
            "llama3_2/1B_full",
            "llama3_2/3B_full",
            "llama3_1/8B_qat_full",  # quantization-aware training: the configs' qat: section
            "llama3_2/1B_qat_full",
        ),
    ),
    Recipe(
        name="lora_finetune_distributed",
        file_path="lora_finetune_distributed.py",
        optional_keys=("qat",),  # quantization-aware training (torchft.training.qat)
        supports_distributed=True,
        configs=_configs(
            "quickstart/lora_distributed",
            "llama2/7B_lora",
            "llama2/7B_qlora",
            "llama2/13B_lora",
            "llama2/13B_qlora",
            "llama2/70B_lora",
            "llama2/70B_qlora",
            "llama3/8B_lora",
            "llama3/8B_qlora",
            "llama3/70B_lora",
            "llama3/70B_qlora",
            "llama3_1/8B_lora",
            "llama3_1/8B_lora_long_context",
            "llama3_1/8B_qlora",
            "llama3_1/70B_lora",
            "llama3_1/70B_qlora",
            "llama3_2/1B_lora",
            "llama3_2/1B_qlora",
            "llama3_2/3B_lora",
            "llama3_2/3B_qlora",
        ),
    ),
    Recipe(
        name="knowledge_distillation_single_device",
        file_path="knowledge_distillation_single_device.py",
        supports_distributed=False,
        configs=_configs("quickstart/kd_single_device", "quickstart/kd_full_single_device",
                         "llama3_2/1B_lora_kd_single_device", "llama3_2/3B_lora_kd_single_device"),
    ),
    Recipe(
        name="knowledge_distillation_distributed",
        file_path="knowledge_distillation_distributed.py",
        supports_distributed=True,
        configs=_configs("quickstart/kd_distributed", "llama3_2/1B_lora_kd_distributed",
                         "llama3_2/3B_lora_kd_distributed", "llama3_1/8B_lora_kd_distributed"),
    ),
    Recipe(
        name="lora_dpo_single_device",
        file_path="lora_dpo_single_device.py",
        optional_keys=("reference",),  # reference: precomputed (docs/preference.md)
        supports_distributed=False,
        configs=_configs(
            "quickstart/lora_dpo_single_device",
            "llama3_2/1B_lora_dpo_single_device",
            "llama3_2/3B_lora_dpo_single_device",
            "llama3_1/8B_lora_dpo_single_device",
            "llama3/8B_lora_dpo_single_device",
            "llama2/7B_lora_dpo_single_device",
        ),
    ),
    Recipe(
        name="lora_dpo_distributed",
        file_path="lora_dpo_distributed.py",
        optional_keys=("reference",),  # reference: precomputed (docs/preference.md)
        supports_distributed=True,
        configs=_configs(
            "quickstart/lora_dpo_distributed",
            "llama3_2/1B_lora_dpo",
            "llama3_2/3B_lora_dpo",
            "llama3_1/8B_lora_dpo",
            "llama3_1/70B_lora_dpo",
            "llama3/8B_lora_dpo",
            "llama2/7B_lora_dpo",
            "llama2/13B_lora_dpo",
        ),
    ),
    Recipe(
        name="full_dpo_single_device",
        file_path="full_dpo_single_device.py",
        optional_keys=("reference",),  # reference: precomputed (docs/preference.md)
        supports_distributed=False,
        configs=_configs("quickstart/full_dpo_single_device"),
    ),
    Recipe(
        name="full_dpo_distributed",
        file_path="full_dpo_distributed.py",
        optional_keys=("reference",),  # reference: precomputed (docs/preference.md)
        supports_distributed=True,
        configs=_configs(
            "quickstart/full_dpo_distributed",
            "llama3_2/1B_full_dpo",
            "llama3_2/3B_full_dpo",
            "llama3_1/8B_full_dpo",
        ),
    ),
    Recipe(
        name="eleuther_eval",
        file_path="eleuther_eval.py",
        supports_distributed=False,
        configs=_configs("eleuther_evaluation"),
    ),
    Recipe(name="generate", file_path="generate.py", supports_distributed=False, configs=_configs("generation")),
    Recipe(name="quantize", file_path="quantize.py", supports_distributed=False, configs=_configs("quantization")),
]


def recipe_names() -> list[str]:
    return [recipe.name for recipe in RECIPES]


def all_configs() -> list[tuple[Recipe, Config]]:
    return [(recipe, config) for recipe in RECIPES for config in recipe.configs]


def get_recipe(name: str) -> Recipe:
    """The registered recipe called ``name``; a ValueError listing close matches otherwise."""
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    hint = did_you_mean(name, recipe_names()) or " (see `tune ls`)"
    raise ValueError(f"no recipe named '{name}'{hint}")


def find_config(name: str) -> tuple[Recipe, Config] | None:
    """The (recipe, config) registered under that config name, or None."""
    for recipe, config in all_configs():
        if config.name == name:
            return recipe, config
    return None


def recipe_for_script(path: str | Path) -> Recipe | None:
    """The registered recipe whose script is the file at ``path`` (None for a user's own script)."""
    try:
        resolved = Path(path).resolve()
    except OSError:
        return None
    for recipe in RECIPES:
        if recipe.path.resolve() == resolved:
            return recipe
    return None


def accepted_keys(recipe: Recipe) -> frozenset[str]:
    """Top-level config keys the recipe reads: declared ones, else the union over its shipped configs."""
    if recipe.config_keys:
        return frozenset(recipe.config_keys) | frozenset(recipe.optional_keys)
    return _shipped_keys(tuple(str(config.path) for config in recipe.configs)) | frozenset(recipe.optional_keys)


@functools.lru_cache(maxsize=None)
def _shipped_keys(paths: tuple[str, ...]) -> frozenset[str]:
    keys: set[str] = set()
    for path in paths:
        if Path(path).is_file():
            keys.update(str(k) for k in load_yaml(path).keys())
    return frozenset(keys)
