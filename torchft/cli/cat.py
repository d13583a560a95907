"""``tune cat <config>``: print a shipped config (or a local YAML) as it is written, comments included."""
from __future__ import annotations

import argparse
import sys

from torchft import registry
from torchft.cli._common import add_subcommand
from torchft.config._load import resolve_config_path

EPILOG = """\
examples:
  tune cat quickstart/lora_single_device
  tune cat llama3_2/1B_lora_single_device | grep lr
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "cat",
        help="print a config",
        description="Print a shipped config by name (see `tune ls`), or a YAML file by path.",
        epilog=EPILOG,
    )
    parser.add_argument("config", help="config name such as llama3_2/1B_lora_single_device, or a YAML path")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.config in registry.recipe_names():
        raise ValueError(
            f"'{args.config}' is a recipe, not a config; `tune cp {args.config} .` copies its script to read"
        )
    path = resolve_config_path(args.config)
    sys.stdout.write(path.read_text())
    return 0
