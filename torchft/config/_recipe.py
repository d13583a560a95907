"""What every recipe script shares: the command line, one-line errors, and the saved resolved config.

A recipe script defines ``def main(cfg: DictConfig) -> None`` and ends with::

    if __name__ == "__main__":
        recipe_main(main)

so it runs as ``python recipes/lora_finetune_single_device.py --config NAME [overrides]``, under
``torchrun ... script.py --config NAME [overrides]`` (what ``tune run`` with torchrun options launches),
and in-process under ``tune run`` (which imports the script and calls ``main(cfg)`` itself).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from omegaconf import DictConfig, OmegaConf

from torchft.config._load import ConfigError, load_config
from torchft.config._validate import unknown_key_problems

log = logging.getLogger("torchft")

SAVED_CONFIG_NAME = "torchft_config.yaml"

# Errors a user triggers (a wrong path, a bad value): the message says it all, no type name needed.
_USER_ERRORS = (ValueError, OSError, KeyError)


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("TUNE_DEBUG", "") not in ("", "0", "false", "False")


def _config_access_error(exc: BaseException) -> str | None:
    """A recipe read a key the config lacks, or one left as ???: say which, and how to set it."""
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        InterpolationResolutionError,
        MissingMandatoryValue,
    )

    key = getattr(exc, "full_key", None)
    if not key:
        return None
    if isinstance(exc, MissingMandatoryValue):
        return f"{key}: missing value (the config says ???); set it with {key}=VALUE"
    if isinstance(exc, (ConfigAttributeError, ConfigKeyError)) and str(exc).startswith("Missing key"):
        return f"the config has no key '{key}', which the recipe reads; add it with +{key}=VALUE"
    if isinstance(exc, InterpolationResolutionError):
        return f"{key}: {str(exc).splitlines()[0]}"
    return None


def error_line(exc: BaseException) -> str:
    """One line describing ``exc`` for a terminal: the first line of its message, type name if unusual."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    config_error = _config_access_error(exc)
    if config_error is not None:
        return config_error
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and message == repr(exc.args[0]):
        message = f"missing key {message}"
    if not isinstance(exc, _USER_ERRORS):
        message = f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)"
    return message


def exit_with_error(exc: BaseException, prog: str, debug: bool) -> NoReturn:
    """Print ``<prog>: error: <one line>`` on stderr (the traceback first when debugging) and exit."""
    if debug:
        traceback.print_exception(exc)
    if debug or not _said_by_another_rank(exc):
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
    sys.exit(130 if isinstance(exc, KeyboardInterrupt) else 1)


# What a collective raises on the ranks left when another rank of the job failed or was killed.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "communicator was aborted")


def _said_by_another_rank(exc: BaseException) -> bool:
    """In a job of several ranks, errors the user would otherwise read once per rank: a start refusal
    (the same config on every rank: rank 0 says it) and a collective that failed because another rank
    is gone (that rank's error, and the launcher's line naming it, are the cause)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if isinstance(exc, ConfigError):
        return not _is_main_process()
    return any(marker in str(exc) for marker in _LOST_PEER)


class CommandLineParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``<prog>: error: <what> (see '<prog> --help')``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def setup_logging() -> None:
    """INFO messages from torchft (DEBUG ones too with ``--debug``) go to stderr unless the application
    configured logging itself."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG if debug_enabled(sys.argv[1:]) else logging.INFO)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# The settings a run's summary names when the config has them (in this order).
_SUMMARY_KEYS = ("checkpointer.checkpoint_dir", "output_dir", "resume_from_checkpoint", "max_steps", "epochs",
                 "batch_size", "gradient_accumulation_steps", "optimizer.lr", "dtype", "device")


def config_summary(cfg: DictConfig, saved_to: Path) -> str:
    """Two lines for the log: the main settings of the run, and where the whole resolved config is."""
    settings = []
    for key in _SUMMARY_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            settings.append(f"{key}={value}")
    model = OmegaConf.select(cfg, "model._component_", default=None)
    if model is not None:
        settings.insert(0, f"model={model}")
    return (f"config: {' '.join(settings)}\n"
            f"  resolved config in {saved_to} (printed in full with --debug)")


def log_and_save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the resolved config to ``<output_dir>/torchft_config.yaml``, log a short summary of it
    (the whole text at debug level), and return that path.

    Interpolations are resolved, so the saved file reruns the exact same run
    (``tune run RECIPE --config <output_dir>/torchft_config.yaml``). In a distributed run only rank 0
    logs and writes.
    """
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = Path(output_dir) / SAVED_CONFIG_NAME
    if not _is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    log.info("%s", config_summary(cfg, path))
    log.debug("Running with config:\n%s", text)
    return path


def check_recipe_keys(cfg: DictConfig, script: str | Path | None, config_name: str | None = None) -> None:
    """Refuse top-level keys the (registered) recipe does not read, so ``max_step: 10`` is not ignored."""
    if script is None:
        return
    from torchft import registry

    recipe = registry.recipe_for_script(script)
    if recipe is None:
        return
    problems = unknown_key_problems(cfg, registry.accepted_keys(recipe))
    if not problems:
        return
    owner = registry.find_config(str(config_name)) if config_name is not None else None
    if owner is not None and owner[0].name != recipe.name:
        raise ValueError(
            f"config {config_name} is for recipe {owner[0].name}, not {recipe.name}: "
            f"tune run {owner[0].name} --config {config_name}"
        )
    if len(problems) > 3:
        keys = [problem.split(":", 1)[0] for problem in problems]
        raise ValueError(
            f"{len(keys)} top-level keys unknown to recipe {recipe.name} ({', '.join(keys[:4])}, ...); "
            "is the config meant for another recipe?"
        )
    raise ValueError("; ".join(problems))


def recipe_main(main: Callable[[DictConfig], object], argv: Sequence[str] | None = None) -> NoReturn:
    """Command line of a recipe script: ``--config NAME_OR_PATH [key=value ...] [--debug]``.

    Loads the config, applies the overrides, refuses unknown top-level keys of a registered recipe,
    calls ``main(cfg)`` and exits 0; any error prints one line on stderr and exits 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    script = getattr(sys.modules.get(main.__module__), "__file__", None)
    prog = Path(script).name if script else "recipe"
    parser = CommandLineParser(
        prog=prog,
        description="Run this recipe with a config and optional key=value overrides.",
        epilog=f"example:\n  python {prog} --config quickstart/lora_single_device max_steps=10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="shipped config name or path to a YAML file")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    args = parser.parse_intermixed_args(argv)
    debug = debug_enabled(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        check_recipe_keys(cfg, script, args.config)
        main(cfg)
    except (Exception, KeyboardInterrupt) as exc:
        exit_with_error(exc, prog, debug)
    sys.exit(0)
