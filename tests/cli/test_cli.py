"""The `tune` CLI through its real entry point: a subprocess per command, checking stdout, stderr, exit codes."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchft import registry
from torchft.cli import main as cli_main

TUNE = [sys.executable, "-m", "torchft.cli.main"]
COMMANDS = ["run", "ls", "cp", "cat", "validate", "download", "estimate"]

TINY_RECIPE = '''\
"""A stand-in recipe: builds its components and writes what it saw."""
import json
import os
from pathlib import Path

from torchft.config import instantiate, log_and_save_config, recipe_main


def main(cfg):
    log_and_save_config(cfg, cfg.output_dir)
    counter = instantiate(cfg.counter)
    if cfg.fail == "value":
        raise ValueError("batch_size (0) must be positive")
    if cfg.fail == "runtime":
        raise RuntimeError("boom inside the recipe")
    if cfg.fail == "interrupt":
        raise KeyboardInterrupt
    if cfg.fail == "missing_key":
        print(cfg.optimizer.weight_decay)  # a key the config does not have
    rank = os.environ.get("RANK", "none")  # set by torchrun
    result = {"counter": dict(counter), "lr": cfg.optimizer.lr, "tasks": list(cfg.tasks)}
    if "WORLD_SIZE" in os.environ:
        result["world_size"] = int(os.environ["WORLD_SIZE"])
    (Path(cfg.output_dir) / f"result_{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    recipe_main(main)
'''

TINY_CONFIG = """\
output_dir: {out}
counter:
  _component_: collections.Counter
  a: 1
optimizer:
  lr: 0.1
tasks: [arc_easy]
fail: null
"""


def tune(*args, env=None, cwd=None, timeout=120):
    full_env = {key: value for key, value in os.environ.items() if key != "TUNE_DEBUG"}
    full_env.update(env or {})
    return subprocess.run([*TUNE, *map(str, args)], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_error_line(result, code=1) -> str:
    """The single `... error: ...` line a failing command prints, after checking the exit code."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 or "INFO" in result.stderr, result.stderr  # recipes log the config before failing
    return lines[-1]


@pytest.fixture
def tiny(tmp_path):
    script = tmp_path / "tiny_recipe.py"
    script.write_text(TINY_RECIPE)
    config = tmp_path / "tiny.yaml"
    out = tmp_path / "out"
    config.write_text(TINY_CONFIG.format(out=out))
    return script, config, out


# --- help and usage ------------------------------------------------------------------------------


def test_help_of_tune_and_every_subcommand():
    result = tune("--help")
    assert result.returncode == 0
    assert "usage: tune" in result.stdout and "examples:" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout
    for command in COMMANDS:
        result = tune(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"tune {command}" in result.stdout and "examples:" in result.stdout, result.stdout
    # the console script declared in pyproject.toml is wired to the same main()
    script = Path(sys.executable).with_name("tune")
    assert subprocess.run([script, "--help"], capture_output=True, text=True).stdout == tune("--help").stdout


def test_usage_errors_exit_2_with_one_line():
    assert tune().returncode == 2
    line = one_error_line(tune("bogus"), code=2)
    assert line == "tune: error: unknown command 'bogus' (choose from run, ls, cp, cat, validate, download, estimate, export) (see 'tune --help')"
    line = one_error_line(tune("valdate", "x.yaml"), code=2)
    assert line == "tune: error: unknown command 'valdate' (did you mean 'validate'?) (see 'tune --help')"
    line = one_error_line(tune("cp", "only_one_argument"), code=2)
    assert line.startswith("tune cp: error: the following arguments are required: dest")
    line = one_error_line(tune("run", "some_recipe"), code=2)
    assert "the following arguments are required: --config" in line
    line = one_error_line(tune("ls", "--bogus"), code=2)
    assert "unrecognized arguments: --bogus" in line


def test_cli_import_does_not_import_torch():
    code = "import sys, torchft.cli.main; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- ls, cp, cat ---------------------------------------------------------------------------------


def test_ls_lists_every_recipe_and_config():
    result = tune("ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    for recipe in registry.RECIPES:
        assert any(line.startswith(recipe.name) for line in lines), recipe.name
        for config in recipe.configs:
            assert any(line.split()[-1] == config.name for line in lines[1:]), config.name


@pytest.fixture
def shipped():
    """A registered recipe and one of its configs (the registry test checks their files exist)."""
    pairs = registry.all_configs()
    assert pairs, "the registry lists no config"
    return pairs[0]


def test_cp_config_and_recipe(tmp_path, shipped):
    recipe, config = shipped
    expected = config.path.read_text()
    # to a file name
    result = tune("cp", config.name, tmp_path / "mine.yaml")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mine.yaml").read_text() == expected
    # to an existing folder: the file keeps its name
    assert tune("cp", config.name, tmp_path).returncode == 0
    assert (tmp_path / config.path.name).read_text() == expected
    # a name without suffix gets .yaml; missing parents need --make-parents
    line = one_error_line(tune("cp", config.name, tmp_path / "a" / "b" / "c"))
    assert line == f"tune: error: folder {tmp_path / 'a' / 'b'} does not exist; pass --make-parents to create it"
    assert tune("cp", config.name, tmp_path / "a" / "b" / "c", "--make-parents").returncode == 0
    assert (tmp_path / "a" / "b" / "c.yaml").read_text() == expected
    # never overwrites unless asked
    (tmp_path / "mine.yaml").write_text("edited: true\n")
    line = one_error_line(tune("cp", config.name, tmp_path / "mine.yaml"))
    assert line == f"tune: error: {tmp_path / 'mine.yaml'} already exists; pass --force to overwrite it"
    assert (tmp_path / "mine.yaml").read_text() == "edited: true\n"
    assert tune("cp", config.name, tmp_path / "mine.yaml", "--force").returncode == 0
    assert (tmp_path / "mine.yaml").read_text() == expected
    # a recipe copies its script, .py added
    assert tune("cp", recipe.name, tmp_path / "my_recipe").returncode == 0
    assert (tmp_path / "my_recipe.py").read_text() == recipe.path.read_text()


def test_cp_and_cat_unknown_names_list_close_matches(shipped):
    recipe, config = shipped
    typo = config.name[:-2] + config.name[-1] + config.name[-2]  # swap the last two letters
    line = one_error_line(tune("cp", typo, "x.yaml"))
    assert line.startswith(f"tune: error: no recipe or config named '{typo}' (did you mean") and f"'{config.name}'" in line
    line = one_error_line(tune("cat", typo))
    assert line.startswith(f"tune: error: no config named '{typo}' and no file at that path (did you mean")
    assert f"'{config.name}'" in line
    line = one_error_line(tune("cat", recipe.name))
    assert line == f"tune: error: '{recipe.name}' is a recipe, not a config; `tune cp {recipe.name} .` copies its script to read"


def test_cat_prints_the_config_as_written(shipped):
    _, config = shipped
    result = tune("cat", config.name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == config.path.read_text()


# --- validate ------------------------------------------------------------------------------------


def test_validate_ok_and_all_problems_at_once(tmp_path, tiny):
    _, config, _ = tiny
    result = tune("validate", config, "optimizer.lr=0.5", "tasks=[a,b]")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK: {config} (top-level keys not checked: pass --recipe NAME)"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            output_dir: /tmp/x
            log_dir: ${output_dirr}/logs
            optimizer:
              _component_: torch.optim.AdamW
              lrr: 0.1
            dataset:
              _component_: collections.Countr
            """
        )
    )
    result = tune("validate", bad)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"tune validate: {bad}: 3 problems",
        "  log_dir: cannot resolve '${output_dirr}/logs': Interpolation key 'output_dirr' not found",
        "  optimizer: unexpected argument 'lrr' for torch.optim.AdamW (did you mean 'lr'?)",
        "  dataset._component_: cannot import 'collections.Countr': module 'collections' has no attribute "
        "'Countr' (did you mean 'Counter'?)",
    ]


def test_validate_takes_the_config_as_tune_run_does(tiny):
    _, config, _ = tiny
    for override in ("optimizer.lr=0.5", "optimizer.lrr=0.5"):  # the second is refused
        positional = tune("validate", config, override)
        with_option = tune("validate", "--config", config, override)
        assert (with_option.returncode, with_option.stdout, with_option.stderr) == (
            positional.returncode, positional.stdout, positional.stderr)
    assert positional.returncode == 1 and "optimizer.lrr" in positional.stderr
    missing = tune("validate")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "tune: error: name the config to check: tune validate <config> [overrides] (or --config <config>)")


def test_validate_refuses_unknown_override_and_reports_yaml_line(tmp_path, tiny):
    _, config, _ = tiny
    line = one_error_line(tune("validate", config, "optimizer.lrr=1e-4"))
    assert line == (
        "tune: error: cannot set 'optimizer.lrr': the config has no such key (did you mean 'optimizer.lr'?); "
        "use +optimizer.lrr=VALUE to add it"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("output_dir: /tmp/x\noptimizer:\n  lr: [0.1\nseed: 3\n")
    line = one_error_line(tune("validate", broken))
    assert line.startswith(f"tune: error: {broken}:4: invalid YAML:")


def test_validate_checks_keys_against_the_recipe(tmp_path, shipped):
    recipe, config = shipped
    out = f"output_dir={tmp_path / 'out'}"  # not what earlier runs left in the config's /tmp folder
    result = tune("validate", config.name, "--skip-checkpoint", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"OK: {config.name} (keys checked against recipe {recipe.name})\n"
    mine = tmp_path / "mine.yaml"
    mine.write_text(config.path.read_text() + "max_stepz: 3\n")
    result = tune("validate", mine, "--recipe", recipe.name, "--skip-checkpoint", out)
    assert result.returncode == 1
    assert any(line.startswith("  max_stepz: unknown key for this recipe") for line in result.stderr.splitlines())


def test_validate_checks_the_checkpoint_architecture_and_names_the_way_out(tmp_path):
    from torchft.training.quickstart import tiny_base_model

    folder = tiny_base_model(str(tmp_path / "tiny"), num_layers=2, embed_dim=64, intermediate_dim=128)
    config = "llama3_2/1B_lora_single_device"
    result = tune("validate", config, f"checkpointer.checkpoint_dir={folder}")
    assert result.returncode == 1
    header, problem = result.stderr.splitlines()
    assert header == f"tune validate: {config}: 1 problem"
    assert problem.startswith(f"  checkpointer.checkpoint_dir ({folder}) holds another architecture than the config's "
                              "model (model vs checkpoint: vocab_size 128256 vs 1024, num_layers 16 vs 2,")
    override = problem.split("with the overrides ")[1].split(" (and")[0].split()
    assert override == ["model=torchft.models.from_hf_config", f"+model.path_or_dict={folder}"]
    result = tune("validate", config, f"checkpointer.checkpoint_dir={folder}", *override)  # the way out works
    assert result.returncode == 0, result.stderr


def test_validate_reports_what_the_run_would_refuse_at_start_all_at_once(tmp_path):
    out = tmp_path / "out"
    (out / "step_3").mkdir(parents=True)  # an earlier run's folder
    config = "llama3_2/1B_lora_single_device"
    result = tune("validate", config, "--skip-checkpoint", f"output_dir={out}", "max_steps=abc", "batch_size=0",
                  "dataset.source=json", f"dataset.data_files={tmp_path / 'nope.jsonl'}",
                  "validation_dataset={_component_: torchft.data.instruct_dataset, source: json}",
                  "+lr_scheduler.num_training_steps=5", "+loss.compile=true")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"tune validate: {config}: 7 problems",
        "  lr_scheduler.num_training_steps is set by the recipe from max_steps/epochs; remove it",
        "  loss.compile is set by the recipe from the top-level compile; remove it",
        "  batch_size (0) must be a positive integer",
        "  max_steps (abc) must be a positive integer",
        f"  dataset: data file not found: {tmp_path / 'nope.jsonl'}",
        "  validation_dataset: source='json' reads local files: set data_files to a path",
        f"  output_dir ({out}) already holds step_3 from an earlier run: continue it with "
        "resume_from_checkpoint=latest, delete its step folders with overwrite_output_dir=true, or choose another "
        "output_dir",
    ]
    # the same checks, one line, when the run starts (in-process: the recipe's main)
    line = one_error_line(tune("run", "lora_finetune_single_device", "--config", config, f"output_dir={out}",
                               "max_steps=abc", "+loss.compile=true"))
    assert line == ("tune: error: loss.compile is set by the recipe from the top-level compile; remove it; "
                    "max_steps (abc) must be a positive integer; "
                    f"output_dir ({out}) already holds step_3 from an earlier run: continue it with "
                    "resume_from_checkpoint=latest, delete its step folders with overwrite_output_dir=true, or choose "
                    "another output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["step_3"]  # nothing written


# --- run -----------------------------------------------------------------------------------------


def test_run_in_process_with_overrides_and_saved_config(tiny):
    script, config, out = tiny
    result = tune("run", script, "--config", config, "optimizer.lr=0.5", "tasks=[a,b]", "counter=builtins.dict", "+counter.b=2")
    assert result.returncode == 0, result.stderr
    assert (out / "result_none.json").read_text() == '{"counter": {"a": 1, "b": 2}, "lr": 0.5, "tasks": ["a", "b"]}'
    saved = (out / "torchft_config.yaml").read_text()
    assert "_component_: builtins.dict" in saved and "lr: 0.5" in saved
    assert "resolved config in" in result.stderr  # a summary is logged at start (the whole config with --debug)
    # the script runs on its own too, and the saved config reruns the same run
    result = subprocess.run(
        [sys.executable, script, "--config", out / "torchft_config.yaml", "optimizer.lr=0.25"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert '"lr": 0.25' in (out / "result_none.json").read_text()


def test_run_errors_inside_the_recipe_are_one_line(tiny):
    script, config, _ = tiny
    line = one_error_line(tune("run", script, "--config", config, "fail=value"))
    assert line == "tune: error: batch_size (0) must be positive"
    line = one_error_line(tune("run", script, "--config", config, "fail=runtime"))
    assert line == "tune: error: RuntimeError: boom inside the recipe (rerun with --debug for the traceback)"
    line = one_error_line(tune("run", script, "--config", config, "fail=interrupt"), code=130)
    assert line == "tune: error: interrupted"
    line = one_error_line(tune("run", script, "--config", config, "fail=missing_key"))
    assert line == (
        "tune: error: the config has no key 'optimizer.weight_decay', which the recipe reads; "
        "add it with +optimizer.weight_decay=VALUE"
    )
    # the traceback only with --debug or TUNE_DEBUG=1
    for result in (tune("run", script, "--config", config, "fail=runtime", "--debug"),
                   tune("run", script, "--config", config, "fail=runtime", env={"TUNE_DEBUG": "1"})):
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr and 'raise RuntimeError("boom' in result.stderr
        assert "_component_: collections.Counter" in result.stderr  # the whole config is logged with --debug
    # the script run directly behaves the same
    result = subprocess.run([sys.executable, script, "--config", config, "fail=value"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == f"{script.name}: error: batch_size (0) must be positive"
    result = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == (
        f"{script.name}: error: the following arguments are required: --config (see '{script.name} --help')\n"
    )


def test_run_unknown_recipe_config_and_script_without_main(tmp_path, tiny):
    script, config, _ = tiny
    line = one_error_line(tune("run", "lora_finetune_singel_device", "--config", config))
    assert line.startswith("tune: error: no recipe named 'lora_finetune_singel_device' (did you mean")
    assert "'lora_finetune_single_device'" in line
    line = one_error_line(tune("run", script, "--config", tmp_path / "nope.yaml"))
    assert line == (f"tune: error: config file {tmp_path / 'nope.yaml'} does not exist (check the path, or give a "
                    "shipped config name: `tune ls` lists them)")
    line = one_error_line(tune("run", tmp_path / "nope.py", "--config", config))
    assert line == f"tune: error: recipe script {tmp_path / 'nope.py'} does not exist"
    no_main = tmp_path / "no_main.py"
    no_main.write_text("x = 1\n")
    line = one_error_line(tune("run", no_main, "--config", config))
    assert line == f"tune: error: {no_main}: a recipe script must define main(cfg); this one does not"


def test_run_hands_torchrun_options_to_torch_distributed(tiny):
    script, config, out = tiny
    result = tune("run", "--standalone", "--nproc_per_node", "1", script, "--config", config, "optimizer.lr=0.5")
    assert result.returncode == 0, result.stderr
    # written by rank 0 of a process torchrun started, with the overrides handed over
    assert (out / "result_0.json").read_text() == '{"counter": {"a": 1}, "lr": 0.5, "tasks": ["arc_easy"], "world_size": 1}'
    # torchrun's own usage errors are one line too
    line = one_error_line(tune("run", "--nproc_per_node"), code=2)
    assert line == "tune run: error: argument --nproc-per-node/--nproc_per_node: expected one argument (see 'tune run --help')"
    # overrides are checked before any process starts
    line = one_error_line(tune("run", "--nproc_per_node", "1", script, "--config", config, "optimizer.lrr=1"))
    assert line.startswith("tune: error: cannot set 'optimizer.lrr'")
    # a failing worker is one line from tune (the worker printed its own line above)
    result = tune("run", "--standalone", "--nproc_per_node", "1", script, "--config", config, "fail=value")
    assert result.returncode == 1
    assert "tiny_recipe.py: error: batch_size (0) must be positive" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("tune: error: 1 recipe process(es) failed (rank 0: exit code 1; its error is printed above)")


def test_run_refuses_torchrun_options_for_a_single_device_recipe(tiny, monkeypatch, capsys):
    script, config, _ = tiny
    monkeypatch.setattr(registry, "RECIPES", [registry.Recipe("tiny_single", str(script), supports_distributed=False)])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["run", "--nproc_per_node", "2", "tiny_single", "--config", str(config)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "tune: error: recipe tiny_single runs on a single device; drop the torchrun options to run it\n"
    )


# --- download ------------------------------------------------------------------------------------


def test_download_against_a_local_hub(tmp_path):
    from tests.cli.fake_hub import COMMIT, FakeHub

    files = {
        "config.json": b'{"hidden_size": 64}',
        "model.safetensors": bytes(range(256)) * 40,
        "original/consolidated.00.pth": b"meta",
    }
    repos = {"acme/tiny-llama": files, "acme/gated-llama": {"config.json": b"{}"}}
    with FakeHub(repos, gated={"acme/gated-llama": "hf_granted"}) as hub:
        env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}  # HF_HUB_OFFLINE too
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")

        def download(*args, **extra_env):
            command = [*TUNE, "download", *map(str, args)]
            return subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True)

        out = tmp_path / "tiny-llama"
        result = download("acme/tiny-llama", "--output-dir", out, "--ignore-patterns", "original/*")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"downloaded acme/tiny-llama to {out} (2 files)"
        assert (out / "config.json").read_bytes() == files["config.json"]
        assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert not (out / "original").exists()
        assert (out / ".torchft_repo_id").read_text() == "acme/tiny-llama\n"

        gated = f"{hub.url}/acme/gated-llama"
        line = one_error_line(download("acme/gated-llama", "--output-dir", tmp_path / "g"))  # 401
        assert line == (
            f"tune: error: acme/gated-llama: the repo is gated or private; request access on {gated}, "
            "then pass an access token with --hf-token TOKEN or set HF_TOKEN"
        )
        line = one_error_line(download("acme/gated-llama", "--output-dir", tmp_path / "g", "--hf-token", "hf_wrong"))  # 403
        assert line.startswith(f"tune: error: acme/gated-llama: access refused with the given token; request access on {gated}")
        result = download("acme/gated-llama", "--output-dir", tmp_path / "g", HF_TOKEN="hf_granted")
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "g" / ".torchft_repo_id").read_text() == "acme/gated-llama\n"

        line = one_error_line(download("acme/tiny-llama", "--output-dir", tmp_path / "o", HF_HUB_OFFLINE="1"))
        assert line == "tune: error: cannot download acme/tiny-llama: HF_HUB_OFFLINE is set; unset it to reach the Hub"
        line = one_error_line(download("acme/no-such-model", "--output-dir", tmp_path / "n"))  # 404
        assert line.startswith("tune: error: acme/no-such-model: no such repo on the Hub")
        # the real client went through the hub's endpoints: revision info, then file metadata
        assert {"GET /api/models/acme/tiny-llama/revision/main", f"HEAD /acme/tiny-llama/resolve/{COMMIT}/config.json"} <= set(
            hub.requests
        )

    # no network: the hub's port is closed now
    line = one_error_line(download("acme/tiny-llama", "--output-dir", tmp_path / "x"))
    assert line == f"tune: error: cannot reach the Hub at {hub.url} to download acme/tiny-llama: check the network connection"


def test_known_import_noise_is_hidden_and_debug_shows_it():
    # torchao logs that its CUDA kernels do not load (always so on a CPU install) and torch warns about
    # its Enum pytree registration; neither means anything to a torchft user.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import torchft, torchao.quantization"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "TUNE_DEBUG": "0"}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "TUNE_DEBUG": "1"}).stderr
    for noise in ("Failed to load", "register_constant() on Enum subclasses is deprecated"):
        assert noise not in quiet, quiet
    if "Failed to load" not in loud:
        pytest.skip("this torchao loads all its kernels: nothing to hide here")
