"""``tune cp <recipe|config> <dest>``: copy a shipped recipe script or config to edit it."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from torchft import registry
from torchft.cli._common import add_subcommand, all_names, shipped_config_path, unknown_name_error

EPILOG = """\
examples:
  tune cp quickstart/lora_single_device my_lora.yaml
  tune cp llama3_2/1B_lora_single_device configs/          keeps the name: configs/1B_lora_single_device.yaml
  tune cp lora_finetune_single_device my_recipe.py         copy a recipe script
  tune cp quickstart/lora_single_device new/dir/lora --make-parents   adds the .yaml suffix
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "cp",
        help="copy a recipe script or a config",
        description="Copy a shipped recipe script (.py) or config (.yaml) to DEST to edit it. DEST may be an "
        "existing folder (the file keeps its name) or a file name (the suffix is added when missing).",
        epilog=EPILOG,
    )
    parser.add_argument("source", help="recipe name or config name (see `tune ls`)")
    parser.add_argument("dest", help="destination file or existing folder")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite DEST if it exists")
    parser.add_argument("--make-parents", action="store_true", help="create DEST's missing parent folders")
    parser.set_defaults(func=main)


def source_path(name: str) -> Path:
    """The shipped file behind a recipe or config name."""
    if name in registry.recipe_names():
        return registry.get_recipe(name).path
    path = shipped_config_path(name)
    if path is None:
        raise unknown_name_error("recipe or config", name, all_names())
    return path


def destination(source: Path, dest: Path) -> Path:
    if dest.is_dir():
        return dest / source.name
    if not dest.suffix:
        return dest.with_name(dest.name + source.suffix)
    return dest


def main(args: argparse.Namespace) -> int:
    source = source_path(args.source)
    if not source.is_file():
        raise FileNotFoundError(f"{args.source}: its file {source} is missing from the installation")
    dest = destination(source, Path(args.dest).expanduser())
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} already exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        if not args.make_parents:
            raise FileNotFoundError(f"folder {dest.parent} does not exist; pass --make-parents to create it")
        dest.parent.mkdir(parents=True)
    shutil.copyfile(source, dest)
    print(f"copied {args.source} to {dest}")
    return 0
