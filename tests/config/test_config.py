"""Config loading, overrides, instantiate, validate and the saved config (in-process, no torch models)."""
import collections
import logging
import textwrap
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from torchft.config import (
    ConfigError,
    RUNTIME_ARGS,
    apply_overrides,
    import_component,
    instantiate,
    load_config,
    log_and_save_config,
    validate,
)

CONFIG = """\
output_dir: /tmp/run
max_steps: 10
tasks: [arc_easy, hellaswag]
optimizer:
  _component_: torch.optim.AdamW
  lr: 2e-5
model:
  _component_: collections.OrderedDict
  a: 1
  b: 2
dataset:
  _component_: tests.config.test_config.make_dataset
  source: json
  transform:
    _component_: collections.Counter
    x: 1
metric_logger:
  _component_: tests.config.test_config.Logger
  log_dir: ${output_dir}/logs
"""


def make_dataset(tokenizer, source, transform=None, split="train"):
    return {"tokenizer": tokenizer, "source": source, "transform": transform, "split": split}


class Logger:
    def __init__(self, log_dir: str, flush_every: int = 1):
        self.log_dir = log_dir
        self.flush_every = flush_every


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def test_load_yaml_and_interpolation(config_file):
    cfg = load_config(config_file)
    assert isinstance(cfg, DictConfig)
    assert cfg.optimizer.lr == pytest.approx(2e-5)  # YAML 1.2-style float, not a string
    assert cfg.metric_logger.log_dir == "/tmp/run/logs"
    cfg = load_config(str(config_file), ["output_dir=/other"])
    assert cfg.metric_logger.log_dir == "/other/logs"  # interpolation follows the override


def test_overrides_set_nested_list_add_remove(config_file):
    cfg = load_config(
        config_file,
        [
            "optimizer.lr=1e-4",
            "tasks=[mmlu,gsm8k]",
            "tasks.0=piqa",
            "+optimizer.weight_decay=0.01",
            "+profiler.enabled=true",
            "~max_steps",
            "~dataset.transform",
            "dataset.source=null",
        ],
    )
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert list(cfg.tasks) == ["piqa", "gsm8k"] and isinstance(cfg.tasks, ListConfig)
    assert cfg.optimizer.weight_decay == 0.01
    assert cfg.profiler.enabled is True
    assert "max_steps" not in cfg and "transform" not in cfg.dataset
    assert cfg.dataset.source is None


def test_add_under_a_null_node_makes_it_a_mapping(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("max_steps: 3\nvalidation_dataset: null\n")
    cfg = load_config(path, ["+validation_dataset.source=json", "+validation_dataset.data_files=val.jsonl"])
    assert dict(cfg.validation_dataset) == {"source": "json", "data_files": "val.jsonl"}
    with pytest.raises(ConfigError, match=r"cannot add 'max_steps.x': its parent is not a mapping"):
        load_config(path, ["+max_steps.x=1"])  # a scalar parent stays an error


def test_override_swaps_component_and_keeps_arguments(config_file):
    cfg = load_config(config_file, ["model=builtins.dict"])
    assert cfg.model == {"_component_": "builtins.dict", "a": 1, "b": 2}
    cfg = load_config(config_file, ["model._component_=collections.Counter"])
    assert instantiate(cfg.model) == collections.Counter(a=1, b=2)


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "optimizer.lrr=1e-4",
            r"cannot set 'optimizer.lrr': the config has no such key \(did you mean 'optimizer.lr'\?\); "
            r"use \+optimizer.lrr=VALUE to add it",
        ),
        ("max_step=3", r"cannot set 'max_step': .*did you mean 'max_steps'"),
        ("~optimzer", r"cannot remove 'optimzer': the config has no such key \(did you mean 'optimizer'\?\)"),
        ("+max_steps=3", r"cannot add 'max_steps': the config already has it; use max_steps=VALUE"),
        ("tasks.5=x", r"cannot set 'tasks.5'"),
        ("max_steps", r"override 'max_steps' must look like key=value, \+key=value or ~key"),
        ("=3", r"must look like key=value"),
    ],
)
def test_bad_overrides_are_refused(config_file, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(config_file, [override])


def test_overrides_must_be_a_list(config_file):
    with pytest.raises(TypeError, match="overrides must be a list"):
        apply_overrides(load_config(config_file), "max_steps=3")


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb:\n  c: [1, 2\nd: 4\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+: invalid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        load_config(listing)


def test_missing_config_file_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="no config named 'no_such/config_name'"):
        load_config("no_such/config_name")


def test_instantiate_nested_merges_caller_kwargs(config_file):
    cfg = load_config(config_file)
    dataset = instantiate(cfg.dataset, tokenizer="tok", split="test")
    assert dataset["tokenizer"] == "tok" and dataset["split"] == "test" and dataset["source"] == "json"
    assert dataset["transform"] == collections.Counter(x=1)  # the nested component was built first
    logger = instantiate(cfg.metric_logger, log_dir="/override")  # caller kwargs win over the config's
    assert logger.log_dir == "/override"
    logger = instantiate(cfg.metric_logger)
    assert logger.log_dir == "/tmp/run/logs"  # interpolation resolved before the call
    assert instantiate({"_component_": "collections.Counter", "x": 3}) == collections.Counter(x=3)
    # an interpolation that points at a whole node passes that node (built, if it is a component)
    linked = OmegaConf.create({"a": {"x": [1, 2]}, "c": {"_component_": "collections.Counter", "y": 1},
                               "b": {"_component_": "builtins.dict", "inner": "${a}", "counter": "${c}"}})
    assert instantiate(linked.b) == {"inner": {"x": [1, 2]}, "counter": collections.Counter(y=1)}
    assert instantiate(None) is None


def test_instantiate_positional_args_reach_the_component():
    import torch

    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(OmegaConf.create({"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5}}).optimizer, params)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5


def test_instantiate_errors_name_the_key_path():
    import torch

    cfg = OmegaConf.create(
        {
            "dataset": {"_component_": "torchft.data.foo"},
            "optimizer": {"_component_": "torch.optim.AdamW", "lrr": 1e-3},
            "logger": {"_component_": "tests.config.test_config.Logger"},
            "inner": {"outer": {"_component_": "builtins.dict", "x": {"_component_": "collections.Countr"}}},
            "plain": {"a": 1},
            "missing": {"_component_": "builtins.dict", "v": "???"},
        }
    )
    with pytest.raises(ConfigError, match=r"^dataset._component_: cannot import 'torchft.data.foo': module 'torchft.data' has no attribute 'foo'"):
        instantiate(cfg.dataset)
    with pytest.raises(ConfigError, match=r"^optimizer: unexpected argument 'lrr' for torch.optim.AdamW \(did you mean 'lr'\?\)$"):
        instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match=r"^logger: missing argument 'log_dir' for tests.config.test_config.Logger$"):
        instantiate(cfg.logger)
    with pytest.raises(ConfigError, match=r"^inner.outer.x._component_: cannot import 'collections.Countr'.*did you mean 'Counter'"):
        instantiate(cfg.inner.outer)
    with pytest.raises(ConfigError, match=r"^plain: has no _component_ key"):
        instantiate(cfg.plain)
    with pytest.raises(ConfigError, match=r"^missing.v: missing value"):
        instantiate(cfg.missing)
    with pytest.raises(ConfigError, match=r"cannot import 'nosuchpackage.x': no module named 'nosuchpackage'"):
        import_component("nosuchpackage.x")


def test_validate_reports_every_problem_at_once(config_file):
    cfg = load_config(config_file)
    assert validate(cfg) == []  # optimizer params and dataset tokenizer are supplied by the recipe
    assert "params" in RUNTIME_ARGS["optimizer"] and "tokenizer" in RUNTIME_ARGS["dataset"]
    cfg = load_config(
        config_file,
        [
            "optimizer.lr=${nowhere}",
            "+optimizer.betas_=[0.9,0.99]",
            "dataset._component_=tests.config.test_config.make_datasett",
            "~metric_logger.log_dir",
            "+max_step=5",
            "+extra=???",
        ],
    )
    accepted = ["output_dir", "max_steps", "tasks", "optimizer", "model", "dataset", "metric_logger", "extra"]
    problems = validate(cfg, accepted_keys=accepted)
    assert problems == [
        "max_step: unknown key for this recipe (did you mean 'max_steps'?)",
        "optimizer: unexpected argument 'betas_' for torch.optim.AdamW (did you mean 'betas'?)",
        "optimizer.lr: cannot resolve '${nowhere}': Interpolation key 'nowhere' not found",
        "dataset._component_: cannot import 'tests.config.test_config.make_datasett': module "
        "'tests.config.test_config' has no attribute 'make_datasett' (did you mean 'make_dataset'?)",
        "metric_logger: missing argument 'log_dir' for tests.config.test_config.Logger",
        "extra: missing value (the config says ???)",
    ]


def test_validate_runtime_args_are_extendable():
    cfg = OmegaConf.create({"loss": {"_component_": "tests.config.test_config.Logger"}})
    assert validate(cfg) == ["loss: missing argument 'log_dir' for tests.config.test_config.Logger"]
    assert validate(cfg, runtime_args={"loss": ["log_dir"]}) == []
    # inside a list, the list's key names the node: a list of datasets gets the dataset's runtime args
    cfg = OmegaConf.create({"dataset": [{"_component_": "tests.config.test_config.make_dataset", "source": "a"}]})
    assert validate(cfg) == []
    # any *_dataset key is a dataset too
    cfg = OmegaConf.create({"validation_dataset": {"_component_": "tests.config.test_config.make_dataset", "source": "a"}})
    assert validate(cfg) == []


def test_log_and_save_config_writes_resolved_yaml(config_file, tmp_path, caplog, monkeypatch):
    cfg = load_config(config_file, [f"output_dir={tmp_path / 'out'}"])
    with caplog.at_level(logging.DEBUG, logger="torchft"):  # the whole config is logged at debug level
        path = log_and_save_config(cfg, cfg.output_dir)
    assert path == tmp_path / "out" / "torchft_config.yaml"
    saved = OmegaConf.load(path)
    assert saved.metric_logger.log_dir == f"{tmp_path}/out/logs"  # resolved, not ${output_dir}/logs
    assert saved.optimizer == cfg.optimizer
    assert f"log_dir: {tmp_path}/out/logs" in caplog.text
    # the saved file reloads into the same run
    assert load_config(path) == OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # other ranks of a distributed run neither log nor write
    monkeypatch.setenv("RANK", "1")
    assert not log_and_save_config(cfg, tmp_path / "rank1").exists()


def test_docstring_example_of_the_package_interface():
    text = textwrap.dedent(
        """
        model:
          _component_: collections.OrderedDict
          a: 1
        """
    )
    cfg = OmegaConf.create(text)
    assert instantiate(cfg.model, b=2) == collections.OrderedDict(a=1, b=2)


def test_import_errors_inside_a_component_module_are_reported_as_such(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_dep.py").write_text("import not_a_real_dependency_xyz\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('CUDA required')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^model._component_: cannot import 'needs_missing_dep.build': No module named 'not_a_real_dependency_xyz'$"):
        import_component("needs_missing_dep.build", "model")
    with pytest.raises(ConfigError, match=r"cannot import 'raises_on_import.build': RuntimeError while importing: CUDA required$"):
        import_component("raises_on_import.build", "model")
    with pytest.raises(ConfigError, match=r"^model._component_: expected a dotted import path"):
        import_component("torch optim", "model")


# --- checkpoint_problems (tune validate's look at checkpointer.checkpoint_dir) ----------------------------


def _finetune_config(checkpoint_dir, model_component="torchft.models.from_hf_config"):
    from torchft.config import load_config

    overrides = [f"checkpointer.checkpoint_dir={checkpoint_dir}", f"model={model_component}"]
    if model_component.endswith("from_hf_config"):
        overrides.append(f"+model.path_or_dict={checkpoint_dir}")
    return load_config("llama3_2/1B_lora_single_device", overrides)


def test_checkpoint_problems_name_a_missing_folder_or_weight_file(tmp_path):
    from torchft.config._validate import checkpoint_problems
    from torchft.training.quickstart import tiny_base_model

    assert checkpoint_problems(_finetune_config(tmp_path / "nowhere")) == [
        f"checkpointer.checkpoint_dir ({tmp_path / 'nowhere'}): folder does not exist (download the model there, "
        f"e.g. `tune download REPO_ID --output-dir {tmp_path / 'nowhere'}`, or set checkpointer.checkpoint_dir=PATH)"
    ]
    folder = tiny_base_model(str(tmp_path / "tiny"), num_layers=2, embed_dim=64, intermediate_dim=128)
    assert checkpoint_problems(_finetune_config(folder)) == []  # the model follows the folder
    (folder / "model.safetensors").unlink()
    [problem] = checkpoint_problems(_finetune_config(folder))
    assert problem.startswith(f"checkpointer.checkpoint_dir: {folder}: no model weights found (expected model.safetensors")
    (folder / "config.json").unlink()
    assert checkpoint_problems(_finetune_config(folder)) == [
        f"checkpointer.checkpoint_dir: {folder / 'config.json'}: config.json not found"]


def test_checkpoint_problems_skip_what_the_run_creates(tmp_path):
    from torchft.config import load_config
    from torchft.config._validate import checkpoint_problems

    # the quickstart's base_model node writes the checkpoint folder when the run starts
    cfg = load_config("quickstart/lora_single_device", [f"base_model.path={tmp_path / 'not_yet'}"])
    assert checkpoint_problems(cfg) == []


@pytest.mark.parametrize("typed", ["Add the two numbers.\n\n3 + 4", "Question: what is 3 + 4?", "Answer:", "see item #7 below"])
def test_plain_text_override_keeps_every_character(typed):
    # YAML would fold the blank line, read `key: value` as a mapping and drop ` #...` as a comment.
    assert load_config("generation", [f"prompt={typed}"]).prompt == typed


def test_typed_override_values_still_parse_as_yaml():
    cfg = load_config("generation", ["prompt='quoted: text'", "top_k=5", "compile=true", "top_p=null"])
    assert (cfg.prompt, cfg.top_k, cfg.compile, cfg.top_p) == ("quoted: text", 5, True, None)
