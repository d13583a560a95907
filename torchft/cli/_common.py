"""Pieces every ``tune`` subcommand shares: a parser whose errors are one line, and name lookups."""
from __future__ import annotations

import argparse
from pathlib import Path

from torchft import registry
from torchft.config._recipe import CommandLineParser
from torchft.config._load import did_you_mean, shipped_config_names, shipped_configs_dir


class TuneParser(CommandLineParser):
    """argparse with one-line usage errors: ``tune cp: error: <what> (see 'tune cp --help')``, exit 2."""


def add_subcommand(subparsers, name: str, *, help: str, description: str, epilog: str) -> TuneParser:
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def shipped_config_path(name: str) -> Path | None:
    path = shipped_configs_dir() / f"{name}.yaml"
    return path if path.is_file() else None


def unknown_name_error(kind: str, name: str, candidates: list[str]) -> ValueError:
    hint = did_you_mean(name, candidates) or " (see `tune ls`)"
    return ValueError(f"no {kind} named '{name}'{hint}")


def all_names() -> list[str]:
    """Recipe names and shipped config names: what ``tune cp`` and friends accept."""
    return registry.recipe_names() + shipped_config_names()
