"""``tune ls``: the registered recipes and their shipped configs, as a table."""
from __future__ import annotations

import argparse

from torchft import registry
from torchft.cli._common import add_subcommand

EPILOG = """\
examples:
  tune ls
  tune cp quickstart/lora_single_device my_lora.yaml    copy a config listed here to edit it
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "ls",
        help="list recipes and their configs",
        description="List the recipes `tune run` knows by name and the configs shipped for each.",
        epilog=EPILOG,
    )
    parser.set_defaults(func=main)


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(left) for left, _ in rows) + 3
    return "\n".join(f"{left:<{width}}{right}".rstrip() for left, right in rows)


def main(args: argparse.Namespace) -> int:
    rows = [("RECIPE", "CONFIG")]
    for recipe in registry.RECIPES:
        name = recipe.name + (" (distributed)" if recipe.supports_distributed else "")
        configs = [config.name for config in recipe.configs] or ["-"]
        rows.append((name, configs[0]))
        rows.extend(("", config) for config in configs[1:])
    print(format_table(rows))
    return 0
