"""Every shell command in README.md and docs/*.md is run, validated or tagged; an unchecked one fails.

What counts as a command:
- each line of a ```bash, ```sh or ```shell block (lines ending in ``\\`` joined with the next; blank
  lines and ``#`` comment lines are not commands), and
- each line starting with ``$ `` in any other block (a transcript: the command after ``$ ``; the lines
  that follow it are its output).

How each command is checked, first rule that applies:
1. Tagged: a ``[needs ...]`` tag (``[needs a download]``, ``[needs a GPU]``, ``[needs a GPU and the
   download]``, ``[needs several GPUs]``, ...) in a comment on the command's own line, or in the comment
   line(s) right above it in the block; a tag in a comment line covers the commands below it up to the
   next comment line. Such a command cannot run here (no GPU, no network); a tagged
   `tune run R --config C key=value...` is still validated as in rule 5.
2. ALLOWED: set-up commands (pip, git clone, venv) and placeholders, listed with the reason.
3. COVERED: the command is run by another test of the suite (named, and that test must exist).
4. `tune ls|cat|cp|validate ...`: run in-process in a temporary folder, in page order (so a
   `tune cp` makes the file a later command reads); exit 0 expected unless it is in EXPECTED_ERRORS
   (transcripts that show an error on purpose).
5. `tune run RECIPE --config CONFIG [overrides]`: validated as `tune validate CONFIG overrides --recipe
   RECIPE --skip-checkpoint` does (the recipe is registered, the config resolves, every override key
   exists, every `_component_` binds), after the SHORTENED table's overrides when the command names one.
   The torchrun options of a distributed recipe are set aside; the user's own data files named in
   USER_FILES are replaced by a small valid file. `tune estimate --config CONFIG [overrides] [options]` is validated the same way (running it takes a
   training step on meta tensors, tens of seconds for an 8B config on this machine's CPUs).
Anything else fails the test: add a tag, or an entry in one of the tables.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from torchft.cli.main import main as tune_main

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"\[needs [^\]]+\]")
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)
ANY_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

ALLOWED = {
    "python3 -m venv .venv && . .venv/bin/activate": "creates the environment the install uses",
    "pip install torch==2.13.0 -e .": "the install itself (the suite runs inside it)",
    'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q': "the test suite itself (.ci/run runs it)",
    "tune run my_recipe.py --config my_config.yaml": "placeholder names for the user's own script and config",
    "tune run --nproc_per_node 2 my_fsdp_recipe.py --config my_config.yaml":
        "placeholder names for the user's own script and config",
    "tune run lora_finetune_single_device --config llama3_2/1B_lora_single_device resume_from_checkpoint=latest":
        "continues an earlier run of the config (resume=latest runs in tests/recipes/test_lora_finetune_recipe.py)",
    "tune run lora_finetune_single_device --config quickstart/lora_single_device resume_from_checkpoint=latest":
        "continues an interrupted quickstart (resume=latest runs in tests/recipes/test_lora_finetune_recipe.py)",
    "tune export --checkpoint_dir /tmp/torchft-quickstart/lora/step_500 --format gguf --dtype q8_0 "
    "--output /tmp/quickstart-q8_0.gguf":
        "reads the quickstart's output; the quickstart test exports that folder to GGUF and loads it in transformers",
    "tune export --checkpoint_dir /tmp/torchft-quickstart/lora/step_500 --adapter-only "
    "--output /tmp/quickstart-lora.gguf":
        "reads the quickstart's output; the quickstart test runs this --adapter-only export on its step folder",
    "tune estimate --config llama3_1/8B_lora_long_context --nproc-per-node 8 --gpu-memory 80GB":
        "an 8B estimate at 65,536 tokens; tests/recipes/test_long_context.py runs it and checks the table's figures",
    "tune validate --for vllm /tmp/torchft-quickstart/lora/step_500":
        "reads the quickstart's output; tests/checkpoint/test_vllm_check.py runs the check on step folders",
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python':
        "an optional install that builds llama.cpp from source (minutes); the suite runs the benchmark where it is",
}
# The user's own files the docs name: each is replaced by a small valid file made in the test's folder.
USER_FILES = {"/data/train.jsonl": "train.jsonl", "./my_data.jsonl": "my_data.jsonl"}
USER_FILE_TEXT = '{"instruction": "Say hi.", "input": "", "output": "hi"}\n'


# Commands that another test of the suite runs as written (only their folders moved under tmp).
COVERED = {
    "tune run lora_finetune_single_device --config quickstart/lora_single_device":
        "tests/recipes/test_quickstart.py::test_lora_quickstart_halves_the_validation_loss_and_loads_in_peft",
    "tune run full_finetune_single_device --config quickstart/full_single_device":
        "tests/recipes/test_quickstart.py::test_full_quickstart_halves_the_validation_loss",
    "tune run --nproc_per_node 2 lora_finetune_distributed --config quickstart/lora_distributed":
        "tests/distributed/test_distributed_recipes.py::test_lora_on_2_ranks_matches_one_device_with_the_global_batch",
    "tune run --nproc_per_node 2 full_finetune_distributed --config quickstart/full_distributed":
        "tests/distributed/test_distributed_recipes.py::test_full_finetune_on_2_ranks_matches_one_device",
    "python benchmarks/bench_gguf_llamacpp.py":  # skipped where llama-cpp-python is not installed
        "tests/benchmarks/test_bench_gguf_llamacpp.py::test_llamacpp_reads_the_exported_gguf_as_torchft_does",
    "tune run --nproc_per_node 2 lora_finetune_distributed --config quickstart/lora_distributed async_save=true":
        "tests/distributed/test_distributed_recipes.py::test_a_background_save_writes_what_a_save_in_line_writes",
}

# Transcripts that show an error on purpose: the command must fail (exit != 0).
EXPECTED_ERRORS = {
    "tune cp quickstart/lora_single_device my_lora.yaml#2",  # the second copy onto an existing file
    "tune cp quickstart/lora_singel_device my_lora.yaml",
    "tune validate typo.yaml --recipe lora_finetune_single_device",
    "tune validate quickstart/lora_single_device optimizer.lrr=1e-4",
    "tune validate llama3_2/1B_lora_single_device --skip-checkpoint output_dir=/tmp/used max_steps=abc batch_size=0 "
    "dataset.source=json dataset.data_files=nope.jsonl "
    "'validation_dataset={_component_: torchft.data.instruct_dataset, source: json}' "
    "+lr_scheduler.num_training_steps=5 +loss.compile=true",
    "tune validate llama3_2/1B_lora_single_device checkpointer.checkpoint_dir=/models/Llama-3.2-3B-Instruct",
    "tune run --nproc_per_node 2 lora_finetune_single_device --config my_lora.yaml",
    "tune run lora_finetune_singel_device --config my_lora.yaml",
    "tune run lora_finetune_single_device --config quickstart/lora_single_device optimizer.lrr=1e-4",
}
ESTIMATE_OPTIONS = {"--gpu-memory": 1, "--json": 0}  # option -> number of values it takes

# Overrides appended before validating a `tune run` command (keyed by its exact text): none needed yet,
# since validation does not run anything; a command that should really run goes to COVERED instead.
SHORTENED: dict[str, list[str]] = {}


def _pages() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _join_continuations(lines: list[str]) -> list[str]:
    joined, current = [], ""
    for line in lines:
        current = f"{current} {line.strip()}" if current else line
        if current.rstrip().endswith("\\"):
            current = current.rstrip()[:-1].rstrip()
            continue
        joined.append(current)
        current = ""
    return joined + ([current] if current else [])


def extract_commands(text: str) -> list[tuple[str, bool]]:
    """(command, tagged) for every command of a page, in page order (see the module docstring)."""
    commands = []
    for match in ANY_BLOCK.finditer(text):
        language, body = match.group(1), match.group(2)
        if language in ("bash", "sh", "shell"):
            tag_above = False
            previous_was_comment = False
            for line in _join_continuations(body.splitlines()):
                stripped = line.strip()
                if not stripped or stripped.startswith("#!"):
                    continue
                if stripped.startswith("#"):
                    # a run of comment lines carries a tag if any of them has one
                    tag_above = (tag_above and previous_was_comment) or bool(TAG.search(stripped))
                    previous_was_comment = True
                    continue
                previous_was_comment = False
                command, _, comment = stripped.partition("  #")
                commands.append((command.strip(), tag_above or bool(TAG.search(comment))))
        else:
            lines = body.splitlines()
            for line in _join_continuations([l for l in lines if l.startswith("$ ") or l.startswith("    ")]):
                if line.startswith("$ "):
                    command, _, comment = line[2:].partition("  #")
                    commands.append((command.strip(), bool(TAG.search(comment))))
    return commands


def _own_output_dir(config: str, overrides: list[str]) -> list[str]:
    """``output_dir=<a folder of this test>`` for a config that has the key and a command that does not set
    it: the pages' default output folders (/tmp/torchft-quickstart/lora, ...) may hold the user's own
    earlier runs on this machine, which a fresh run rightly refuses; the command itself is what is checked."""
    from torchft.config import load_config

    if any(o.lstrip("+~").startswith("output_dir") for o in overrides):
        return []
    try:
        has_output_dir = "output_dir" in load_config(config, [o for o in overrides if "=" in o or o.startswith("~")])
    except Exception:
        return []  # validation reports why the config does not load
    return [f"output_dir={Path.cwd() / 'outputs'}"] if has_output_dir else []


def _tune(argv: list[str]) -> int:
    try:
        return tune_main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _check(command: str, key: str, tagged: bool, capsys) -> str | None:
    """None when the command is checked, else why it is not."""
    if command in ALLOWED or (tagged and not re.match(r"tune run .*--config \S+( \S+=\S+)*$", command)):
        return None
    if command in COVERED:
        file, _, name = COVERED[command].partition("::")
        return None if f"def {name}(" in (ROOT / file).read_text() else f"COVERED names a missing test {COVERED[command]}"
    for placeholder, local in USER_FILES.items():
        if placeholder in command:
            Path(local).write_text(USER_FILE_TEXT)
            command = command.replace(placeholder, local)
    words = shlex.split(command)
    if not words or words[0] != "tune" or len(words) < 2:
        return "not a tune command: tag it, allow it or cover it"
    expect_error = key in EXPECTED_ERRORS
    if words[1] == "run" and not expect_error:
        while len(words) > 3 and words[2].startswith("--") and words[2] != "--config":
            words = ["tune", "run", *words[4:]]  # a torchrun option and its value, set aside
        if "--config" not in words or words[2].startswith("-"):
            return "a tune run this test cannot validate: tag it or list it"
        at = words.index("--config")
        recipe, config, overrides = words[2], words[at + 1], words[at + 2:]
        overrides = [*overrides, *SHORTENED.get(command, [])]
        argv = ["validate", config, *overrides, *_own_output_dir(config, overrides), "--recipe", recipe,
                "--skip-checkpoint"]
    elif words[1] == "estimate":
        rest, config = [], None
        words_left = iter(words[2:])
        for word in words_left:
            if word == "--config":
                config = next(words_left)
            elif word in ESTIMATE_OPTIONS:
                for _ in range(ESTIMATE_OPTIONS[word]):
                    next(words_left)
            else:
                rest.append(word)
        if config is None:
            return "a tune estimate without --config"
        argv = ["validate", config, *rest, *_own_output_dir(config, rest), "--skip-checkpoint"]
    elif words[1] == "validate" and len(words) > 2 and not words[2].startswith("-") and not expect_error:
        overrides = [w for w in words[3:] if not w.startswith("--") and ("=" in w or w.startswith("~"))]
        argv = [*words[1:], *_own_output_dir(words[2], overrides)]
    elif words[1] in ("ls", "cat", "cp", "validate", "run"):
        argv = words[1:]
    else:
        return f"tune {words[1]} cannot run here: tag it"
    rc = _tune(argv)
    out = capsys.readouterr()
    if (rc != 0) != expect_error:
        return f"exit {rc} ({'an error was expected' if expect_error else out.err.strip()[-500:]})"
    return None


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_documented_command_is_run_validated_or_tagged(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen: dict[str, int] = {}
    problems = []
    for command, tagged in extract_commands(page.read_text()):
        seen[command] = seen.get(command, 0) + 1
        key = command if seen[command] == 1 else f"{command}#{seen[command]}"
        why = _check(command, key, tagged, capsys)
        if why:
            problems.append(f"{command}\n    -> {why}")
    assert not problems, f"{page.name}: unchecked commands:\n" + "\n".join(problems)


def test_the_extraction_rule():
    page = (
        "```bash\n# setup [needs a download]\ntune download x --output-dir y\n# plain\ntune ls\n"
        "tune run a --config b \\\n    k=v  # [needs a GPU]\n```\n"
        "```text\n$ tune cat c\noutput\n```\n"
    )
    assert extract_commands(page) == [
        ("tune download x --output-dir y", True),
        ("tune ls", False),
        ("tune run a --config b k=v", True),
        ("tune cat c", False),
    ]


def test_an_unchecked_or_broken_command_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "tag it" in _check("tune download x --output-dir y", "k", False, capsys)
    assert _check("tune download x --output-dir y", "k", True, capsys) is None
    assert "not a tune command" in _check("curl https://example.com", "k", False, capsys)
    broken = "tune run lora_finetune_single_device --config quickstart/lora_single_device optimizer.lrr=1"
    assert "exit 1" in _check(broken, "k", False, capsys)
    assert "exit 1" in _check(broken, "k", True, capsys)  # a tagged `tune run` is still validated
    assert _check(broken.replace("lrr", "lr"), "k", False, capsys) is None
    # a page's default output folder holding the user's own finished run does not fail its commands
    used = tmp_path / "used"
    (used / "step_500").mkdir(parents=True)
    (tmp_path / "mine.yaml").write_text((ROOT / "recipes" / "configs" / "quickstart" / "lora_single_device.yaml")
                                        .read_text().replace("/tmp/torchft-quickstart/lora", str(used)))
    for command in ("tune run lora_finetune_single_device --config mine.yaml", "tune validate mine.yaml"):
        assert _check(command, "k", False, capsys) is None, command
    assert "already holds step_500" in _check(f"tune validate mine.yaml output_dir={used}", "k", False, capsys)
