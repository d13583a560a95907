"""Metric loggers: stdout, JSONL on disk, TensorBoard and Weights & Biases.

Every logger has the same three methods, so a config picks one with ``_component_``:

    metric_logger:
      _component_: torchft.training.metric_logging.JSONLLogger
      log_dir: ${output_dir}/logs

``log_config(config)`` records the resolved config once, ``log(metrics, step)`` records a dict of
scalars, ``close()`` flushes. ``continue_from(step)`` is called as a run starts after ``step`` (0 for a
fresh run): what an earlier run logged for later steps is superseded (the JSONL file drops it).
``MultiLogger`` fans out to several.
"""
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path


def _scalars(metrics: Mapping) -> dict:
    """Plain python floats/ints (tensors and numpy scalars converted), None values dropped."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            continue
        out[key] = value.item() if hasattr(value, "item") else value
    return out


class MetricLogger:
    """Base class: a logger that records nothing."""

    def log_config(self, config: Mapping) -> None:
        pass

    def continue_from(self, step: int) -> None:
        pass

    def log(self, metrics: Mapping, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class StdoutLogger(MetricLogger):
    """One line per logged step: ``step 10 | loss 1.2345 | lr 2e-05 | ...``."""

    def __init__(self, stream=None):
        self._stream = stream or sys.stdout

    def log(self, metrics: Mapping, step: int) -> None:
        parts = [f"step {step}"]
        for key, value in _scalars(metrics).items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        print(" | ".join(parts), file=self._stream, flush=True)


class JSONLLogger(MetricLogger):
    """Appends ``{"step": N, ...metrics}`` lines to ``<log_dir>/metrics.jsonl``; the config goes to
    ``<log_dir>/config.json``. A run resumed after step N keeps the earlier lines up to step N and
    appends its own, so every step appears once (a fresh run starts the file anew)."""

    def __init__(self, log_dir: str, filename: str = "metrics.jsonl"):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / filename
        self._file = open(self.path, "a", encoding="utf-8")

    def log_config(self, config: Mapping) -> None:
        (self.log_dir / "config.json").write_text(json.dumps(dict(config), indent=2, default=str) + "\n")

    def continue_from(self, step: int) -> None:
        """Keep the lines of steps 1..``step`` (and step 0's, when ``step`` > 0); drop the rest."""
        self._file.close()
        kept = []
        if step > 0 and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping, step: int) -> None:
        self._file.write(json.dumps({"step": step, **_scalars(metrics)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _install_hint(package: str) -> str:
    # PyPI's "torchft" is another project: name the package itself, or the extra of a local clone.
    return f'pip install {package} (or, in a torchft clone, pip install -e ".[{package}]")'


class TensorBoardLogger(MetricLogger):
    """Scalars under their metric names in ``log_dir`` (``tensorboard --logdir <log_dir>``)."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional extra
            raise ImportError(f"TensorBoardLogger needs tensorboard: {_install_hint('tensorboard')}") from e
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log_config(self, config: Mapping) -> None:
        text = json.dumps(dict(config), indent=2, default=str)
        self._writer.add_text("config", f"```\n{text}\n```", global_step=0)

    def log(self, metrics: Mapping, step: int) -> None:
        for key, value in _scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandBLogger(MetricLogger):
    """A Weights & Biases run. ``mode="offline"`` (or ``WANDB_MODE=offline``) writes the run under
    ``<log_dir>/wandb/`` with no network; ``wandb sync`` uploads it later.

    Besides W&B's own record file, the run's ``files/`` folder gets a readable ``config.json`` and
    ``metrics.jsonl`` (uploaded with the run when online), so an offline run can be inspected as is.
    """

    def __init__(self, project: str = "torchft", log_dir: str | None = None, name: str | None = None,
                 entity: str | None = None, mode: str | None = None):
        try:
            import wandb
        except ImportError as e:  # wandb is an optional extra
            raise ImportError(f"WandBLogger needs wandb: {_install_hint('wandb')}") from e
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, dir=log_dir, name=name, entity=entity,
                              mode=mode or os.environ.get("WANDB_MODE"), reinit="finish_previous")
        self._files = JSONLLogger(self.run.dir)

    def log_config(self, config: Mapping) -> None:
        self.run.config.update(dict(config), allow_val_change=True)
        self._files.log_config(config)

    def continue_from(self, step: int) -> None:
        self._files.continue_from(step)

    def log(self, metrics: Mapping, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)
        self._files.log(metrics, step)

    def close(self) -> None:
        self._files.close()
        self.run.finish()


class MultiLogger(MetricLogger):
    """Sends everything to each of ``loggers`` (e.g. JSONL on disk and W&B)."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = list(loggers)

    def log_config(self, config: Mapping) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def continue_from(self, step: int) -> None:
        for logger in self.loggers:
            logger.continue_from(step)

    def log(self, metrics: Mapping, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
