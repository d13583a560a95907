"""The recipe registry never drifts from the files: scripts exist, configs exist, validate, and are all listed."""
import ast
from pathlib import Path

import pytest

from torchft import registry
from torchft.config import load_config, shipped_config_names, validate

RECIPES = registry.RECIPES
CONFIGS = registry.all_configs()


def test_names_are_unique_and_follow_the_layout():
    assert RECIPES, "the registry lists no recipe"
    assert len({r.name for r in RECIPES}) == len(RECIPES)
    assert len({c.name for _, c in CONFIGS}) == len(CONFIGS)
    for recipe in RECIPES:
        assert recipe.file_path == f"{recipe.name}.py", recipe
    for _, config in CONFIGS:
        assert config.file_path == f"configs/{config.name}.yaml", config


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_every_registered_script_exists_and_defines_main(recipe):
    assert recipe.path.is_file(), f"{recipe.name}: {recipe.path} does not exist"
    tree = ast.parse(recipe.path.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "main" in functions, f"{recipe.path} must define main(cfg) for `tune run`"
    assert "recipe_main" in recipe.path.read_text(), f"{recipe.path} must end with recipe_main(main)"


def test_every_shipped_yaml_is_registered_and_every_registered_config_is_shipped():
    registered = sorted(config.name for _, config in CONFIGS)
    shipped = shipped_config_names()
    assert sorted(set(shipped) - set(registered)) == [], "shipped configs missing from torchft/registry.py"
    assert sorted(set(registered) - set(shipped)) == [], "registered configs with no YAML under recipes/configs"


@pytest.mark.parametrize("recipe, config", CONFIGS, ids=lambda x: getattr(x, "name", ""))
def test_every_shipped_config_passes_validate(recipe, config, tmp_path):
    cfg = load_config(config.name)
    if "output_dir" in cfg:  # validate looks at output_dir too: not at what earlier runs left in /tmp
        cfg.output_dir = str(tmp_path)
    assert validate(cfg, registry.accepted_keys(recipe), recipe.runtime_args) == []


def test_registry_lookups():
    recipe, config = CONFIGS[0]
    assert registry.get_recipe(recipe.name) is recipe
    assert registry.find_config(config.name) == (recipe, config)
    assert registry.find_config("no/such_config") is None
    assert registry.recipe_for_script(Path(recipe.path)) is recipe
    assert registry.recipe_for_script(__file__) is None
    assert set(load_config(config.name).keys()) <= registry.accepted_keys(recipe)
    with pytest.raises(ValueError, match=r"no recipe named 'lora_finetune_singel_device' \(did you mean"):
        registry.get_recipe("lora_finetune_singel_device")


def test_a_config_of_another_recipe_is_refused_with_the_right_command():
    from torchft.config._recipe import check_recipe_keys

    first, first_config = CONFIGS[0]
    cfg = load_config(first_config.name)
    check_recipe_keys(cfg, first.path, first_config.name)  # its own recipe: fine
    # another recipe that does not read some key of this config
    others = [r for r in RECIPES if r.name != first.name and set(cfg.keys()) - registry.accepted_keys(r)]
    assert others, "every recipe reads every key of the first config"
    other = others[0]
    with pytest.raises(ValueError, match=rf"^config {first_config.name} is for recipe {first.name}, not {other.name}: "
                       rf"tune run {first.name} --config {first_config.name}$"):
        check_recipe_keys(cfg, other.path, first_config.name)
    cfg["max_stepz"] = 3
    with pytest.raises(ValueError, match=r"^max_stepz: unknown key for this recipe"):
        check_recipe_keys(cfg, first.path, "my_copy.yaml")
