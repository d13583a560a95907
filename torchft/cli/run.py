"""``tune run [torchrun options] <recipe|path.py> --config <name|path.yaml> [overrides]``.

Without torchrun options the recipe runs in this process: the script is imported by path and its
``main(cfg)`` called with the loaded config. With torchrun options (``--nproc_per_node 2``,
``--nnodes``, ``--rdzv-endpoint`` ...) the run is handed to ``torch.distributed.run``, which starts
``python <script> --config ... [overrides]`` per process (the script's ``recipe_main`` takes it from
there); a recipe not marked distributed in the registry is refused.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from torchft import registry
from torchft.cli._common import TuneParser, add_subcommand, unknown_name_error
from torchft.config._load import load_config
from torchft.config._recipe import check_recipe_keys, setup_logging

USAGE = "tune run [torchrun options] <recipe|path.py> --config <name|path.yaml> [key=value ...]"
EPILOG = """\
examples:
  tune run lora_finetune_single_device --config quickstart/lora_single_device
  tune run lora_finetune_single_device --config llama3_2/1B_lora_single_device \\
      checkpointer.checkpoint_dir=/tmp/Llama-3.2-1B-Instruct max_steps=100 optimizer.lr=1e-4
  tune run my_recipe.py --config my_config.yaml       a local script and config
  tune run --nproc_per_node 8 lora_finetune_distributed --config llama3_1/8B_lora   8 GPUs (FSDP2)
  tune run --nproc_per_node 2 lora_finetune_distributed --config quickstart/lora_distributed   2 CPU processes

overrides: key=value sets an existing key (nested: optimizer.lr=1e-4; lists: tasks=[a,b]),
+key=value adds one, ~key removes one, model=<dotted.builder> swaps a component keeping its arguments.
torchrun options go before the recipe; see `torchrun --help` for all of them.
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "run",
        help="run a recipe with a config",
        description="Run a recipe (a registered name, see `tune ls`, or a path to a script) with a config.",
        epilog=EPILOG,
    )
    parser.usage = USAGE
    parser.add_argument("recipe", help="recipe name or path to a recipe script (.py)")
    _add_recipe_arguments(parser)
    parser.set_defaults(func=main)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config name or path to a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")


def wants_torchrun(argv: Sequence[str]) -> bool:
    """True when options come before the recipe: ``tune run --nproc_per_node 2 recipe ...``."""
    if not argv or not argv[0].startswith("-"):
        return False
    return argv[0] not in ("-h", "--help") and not argv[0].startswith("--config")


def resolve_recipe(recipe: str) -> tuple[Path, registry.Recipe | None]:
    """The script of a registered recipe name, or a local script path (with its entry, if registered)."""
    if recipe in registry.recipe_names():
        entry = registry.get_recipe(recipe)
        if not entry.path.is_file():
            raise FileNotFoundError(f"recipe {recipe}: its script {entry.path} is missing from the installation")
        return entry.path, entry
    path = Path(recipe).expanduser()
    if path.is_file():
        return path.resolve(), registry.recipe_for_script(path)
    if recipe.endswith(".py") or "/" in recipe:
        raise FileNotFoundError(f"recipe script {recipe} does not exist")
    raise unknown_name_error("recipe", recipe, registry.recipe_names())


def load_recipe_main(script: Path):
    """Import a recipe script by path (as ``python script.py`` would see it) and return its ``main``."""
    module_name = f"torchft_recipe_{script.stem}"
    spec = importlib.util.spec_from_file_location(module_name, script)
    if spec is None or spec.loader is None:
        raise ValueError(f"{script}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    sys.path.insert(0, str(script.parent))  # the script's own folder, as `python script.py` does
    spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if not callable(main):
        raise ValueError(f"{script}: a recipe script must define main(cfg); this one does not")
    return main


def main(args: argparse.Namespace) -> int:
    script, _ = resolve_recipe(args.recipe)
    cfg = load_config(args.config, args.overrides)
    check_recipe_keys(cfg, script, args.config)
    recipe_main = load_recipe_main(script)
    setup_logging()
    sys.argv = [str(script), "--config", args.config, *args.overrides]
    recipe_main(cfg)
    return 0


def _as_int(value) -> int | None:
    low, _, high = str(value).partition(":")  # nnodes is "N" or "MIN:MAX"
    if high and high != low:
        return None
    try:
        return int(low)
    except (TypeError, ValueError):
        return None  # "gpu", "auto", an elastic range "1:4": torchrun decides


def check_launch(nproc_per_node, nnodes, cfg) -> None:
    """Refuse, before any process starts, more processes than visible GPUs and a global
    ``batch_size`` the world size does not divide."""
    import torch

    nproc = _as_int(nproc_per_node)
    if nproc is not None and str(cfg.get("device") or "").startswith("cuda"):
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise ValueError(f"--nproc_per_node ({nproc}) is above the {visible} visible GPU(s) of this machine "
                             f"(one process per GPU): use --nproc_per_node {visible}" if visible else
                             f"--nproc_per_node ({nproc}) needs {nproc} GPUs but none is visible: "
                             "run on CPUs with device=cpu (gloo)")
    nodes = _as_int(nnodes)
    batch_size = cfg.get("batch_size")
    if nproc is not None and nodes is not None and isinstance(batch_size, int) and batch_size > 0:
        from torchft.training.distributed import per_rank_batch_size

        per_rank_batch_size(batch_size, nproc * nodes)


def failure_cause(rank: int, failure) -> str:
    """What ended the first failed rank: an error it printed, or a signal (which prints nothing)."""
    if failure.exitcode >= 0:
        return f"rank {rank}: exit code {failure.exitcode}; its error is printed above"
    how = f"rank {rank}: exit code {failure.exitcode}, killed by signal {-failure.exitcode} ({failure.signal_name()})"
    if failure.signal_name() == "SIGKILL":  # the kernel's out-of-memory killer sends SIGKILL
        how += ": likely out of host memory, no error was printed"
    return how


def run_distributed(argv: Sequence[str]) -> int:
    """Hand ``tune run <torchrun options> <recipe> --config ...`` over to torch.distributed.run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    torchrun_parser = get_args_parser()
    torchrun_parser.prog = "tune run"
    torchrun_parser.usage = USAGE
    torchrun_parser.error = TuneParser.error.__get__(torchrun_parser)  # one-line usage errors here too
    torchrun_args = torchrun_parser.parse_args(list(argv))

    recipe_parser = TuneParser(prog="tune run", usage=USAGE)
    _add_recipe_arguments(recipe_parser)
    recipe_args = recipe_parser.parse_intermixed_args(torchrun_args.training_script_args)

    script, entry = resolve_recipe(torchrun_args.training_script)
    if entry is not None and not entry.supports_distributed:
        distributed = [r.name for r in registry.RECIPES if r.supports_distributed]
        choices = f"; distributed recipes: {', '.join(distributed)}" if distributed else ""
        raise ValueError(
            f"recipe {entry.name} runs on a single device; drop the torchrun options to run it{choices}"
        )
    # Check the config and overrides here, once, before any process starts.
    cfg = load_config(recipe_args.config, recipe_args.overrides)
    check_recipe_keys(cfg, script, recipe_args.config)
    check_launch(torchrun_args.nproc_per_node, torchrun_args.nnodes, cfg)

    torchrun_args.training_script = str(script)
    torchrun_args.training_script_args = ["--config", recipe_args.config, *recipe_args.overrides]
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        run(torchrun_args)
    except SignalException as err:
        # torchrun passed the signal on to the recipe processes, which saved a step folder and exited.
        print(f"tune: stopped by {err.sigval.name}; the recipe processes exited after saving (see above)",
              file=sys.stderr)
        raise SystemExit(128 + int(err.sigval)) from None
    except ChildFailedError as err:
        # The rank that failed first is the cause; the others were stopped because of it.
        rank, first = err.get_first_failure()
        raise ChildProcessError(f"{len(err.failures)} recipe process(es) failed ({failure_cause(rank, first)})") from None
    return 0
