"""``tune validate <config> [overrides]``: check a config without running it; all problems at once."""
from __future__ import annotations

import argparse
import sys

from torchft import registry
from torchft.cli._common import add_subcommand
from torchft.config._load import load_config
from torchft.config._validate import checkpoint_problems, validate

EPILOG = """\
examples:
  tune validate llama3_2/1B_lora_single_device
  tune validate my_lora.yaml --recipe lora_finetune_single_device optimizer.lr=1e-4

checks: every _component_ imports and its arguments bind to its signature (arguments the recipe passes
itself, such as the optimizer's params, are not asked for), ${...} interpolations resolve, no ??? is
left, and, when the recipe is known, no top-level key is unknown to it. For a fine-tuning config, the
checkpoint folder (checkpointer.checkpoint_dir) must exist and hold its config and weight files, and the
model the config builds must have its architecture (read from config.json; no weight is loaded);
--skip-checkpoint leaves the folder out (e.g. before downloading the model).
--for vllm FOLDER checks a model folder instead (a step folder, an HF folder or a LoRA adapter folder)
against what vLLM serves: a Llama config, the tokenizer, the weights (lm_head unless tied), and for the
adapter a rank of at most 512, LoRA on q/k/v/o/gate/up/down only, no modules_to_save, no DoRA, no biases.
exit status: 0 when valid, 1 when a problem was found (each printed on its own line).
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "validate",
        help="check a config and overrides without running anything",
        description="Check a config (shipped name or YAML path) with optional key=value overrides.",
        epilog=EPILOG,
    )
    parser.add_argument("config", nargs="?", help="config name (see `tune ls`) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    # `tune run` and `tune estimate` take --config: the same spelling works here
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="the config, as in `tune run`")
    parser.add_argument(
        "--recipe",
        help="recipe whose keys to check against (default: the recipe a shipped config is registered under)",
    )
    parser.add_argument("--for", dest="engine", choices=["vllm"],
                        help="check a model folder (given in place of the config) for this inference engine")
    parser.add_argument("--skip-checkpoint", action="store_true",
                        help="do not look at checkpointer.checkpoint_dir (files, architecture)")
    parser.set_defaults(func=main)


def _report(name: str, problems: list[str], checked: str) -> int:
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        print(f"tune validate: {name}: {len(problems)} {noun}", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"OK: {name}{checked}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from torchft.checkpoint.vllm_check import vllm_problems

        if args.config is None or args.overrides:
            raise ValueError("name one folder to check: tune validate --for vllm <folder>")
        return _report(args.config, vllm_problems(args.config), " (vLLM can serve it)")
    if args.config_option is not None:  # then a first positional word is an override, not the config
        args.overrides = [w for w in (args.config, *args.overrides) if w is not None]
        args.config = args.config_option
    if args.config is None:
        raise ValueError("name the config to check: tune validate <config> [overrides] (or --config <config>)")
    cfg = load_config(args.config, args.overrides)
    recipe = registry.get_recipe(args.recipe) if args.recipe else None
    if recipe is None:
        found = registry.find_config(args.config)
        recipe = found[0] if found else None
    problems = validate(
        cfg,
        accepted_keys=registry.accepted_keys(recipe) if recipe else None,
        runtime_args=recipe.runtime_args if recipe else None,
    )
    if not args.skip_checkpoint:
        # Only for nodes without problems of their own (they would fail to build for the same reason).
        faulty = {problem.split(":")[0].split(".")[0] for problem in problems}
        if "checkpointer" not in faulty:
            problems += checkpoint_problems(cfg, compare_model="model" not in faulty)
    if recipe is not None:
        checked = f" (keys checked against recipe {recipe.name})"
    else:
        checked = " (top-level keys not checked: pass --recipe NAME)"
    return _report(args.config, problems, checked)
