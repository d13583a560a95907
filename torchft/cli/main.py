"""Entry point of the ``tune`` console script: parse the subcommand, run it, turn errors into one line.

Each subcommand lives in its own module (run, ls, cp, cat, validate, download, estimate, export) as a thin layer over a
library function. Nothing here imports torch: ``tune --help`` and ``tune ls`` answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from torchft.cli import cat, cp, download, estimate, export, ls, run, validate
from torchft.cli._common import TuneParser
from torchft.config._load import did_you_mean
from torchft.config._recipe import debug_enabled, exit_with_error

COMMANDS = ["run", "ls", "cp", "cat", "validate", "download", "estimate", "export"]

EPILOG = """\
examples:
  tune ls                                          list recipes and their configs
  tune download meta-llama/Llama-3.2-1B-Instruct --output-dir /tmp/Llama-3.2-1B-Instruct
  tune cp quickstart/lora_single_device my_lora.yaml
  tune cat quickstart/lora_single_device           print a shipped config
  tune validate my_lora.yaml optimizer.lr=1e-4     check a config (and overrides) without running it
  tune estimate --config my_lora.yaml --gpu-memory 24GiB   predicted peak GPU memory, and what makes it fit
  tune run lora_finetune_single_device --config my_lora.yaml max_steps=100
  tune export --checkpoint_dir out/step_500 --format gguf --dtype q8_0 --output model.gguf
  tune run --nproc_per_node 2 my_fsdp_recipe.py --config my_config.yaml   (a recipe that supports torchrun)

add --debug (or set TUNE_DEBUG=1) to see the full traceback of an error.
"""


def build_parser() -> TuneParser:
    parser = TuneParser(
        prog="tune",
        description="Fine-tune Llama models with torchft recipes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors (or TUNE_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=TuneParser)
    for module in (run, ls, cp, cat, validate, download, estimate, export):
        module.register(subparsers)
    return parser


def parse_args(parser: TuneParser, argv: list[str]) -> argparse.Namespace:
    # argparse hands a subcommand's trailing positionals to the first one it meets, so
    # `tune run recipe --config x a=b` leaves `a=b` over; those are the overrides, in order.
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    # --debug may come anywhere (also after a recipe's overrides), so it is taken out before parsing.
    argv = [arg for arg in argv if arg != "--debug"]
    if debug:
        os.environ["TUNE_DEBUG"] = "1"  # reaches recipe processes started by torchrun too
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        hint = did_you_mean(argv[0], COMMANDS) or f" (choose from {', '.join(COMMANDS)})"
        parser.error(f"unknown command '{argv[0]}'{hint}")
    try:
        if argv[0] == "run" and run.wants_torchrun(argv[1:]):
            return run.run_distributed(argv[1:])
        args = parse_args(parser, argv)
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        exit_with_error(exc, "tune", debug)


if __name__ == "__main__":
    sys.exit(main())
