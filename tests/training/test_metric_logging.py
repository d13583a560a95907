"""Each metric logger writes what it promises (W&B offline: the run folder holds metrics and config)."""
import io
import json

import pytest

from torchft.training.metric_logging import JSONLLogger, MultiLogger, StdoutLogger, TensorBoardLogger, WandBLogger


def test_stdout_and_jsonl(tmp_path):
    out = io.StringIO()
    logger = MultiLogger([StdoutLogger(out), JSONLLogger(tmp_path)])
    logger.log_config({"lr": 0.1, "model": {"dim": 4}})
    logger.log({"loss": 1.5, "lr": 0.1, "skipped": None}, step=1)
    logger.log({"loss": 1.25}, step=2)
    logger.close()
    assert out.getvalue().splitlines()[0] == "step 1 | loss 1.5 | lr 0.1"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.5, "lr": 0.1}, {"step": 2, "loss": 1.25}]
    assert json.loads((tmp_path / "config.json").read_text())["model"] == {"dim": 4}


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (torchft[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log_config({"lr": 0.1})
    logger.log({"loss": 2.0}, step=1)
    logger.log({"loss": 1.0}, step=2)
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.0)]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (torchft[wandb])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandBLogger(project="torchft-test", log_dir=str(tmp_path))
    logger.log_config({"lr": 0.125, "batch_size": 3})
    for step, loss in [(1, 2.0), (2, 0.75)]:
        logger.log({"loss": loss}, step=step)
    logger.close()
    import wandb

    # W&B's service process writes the record file; it is complete once the service has shut down, as it
    # is when the training process exits (and a user then runs `wandb sync`).
    wandb.teardown()
    (run_dir,) = [p for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert json.loads((run_dir / "files" / "config.json").read_text()) == {"lr": 0.125, "batch_size": 3}
    lines = (run_dir / "files" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.75}]
    (record_file,) = run_dir.glob("*.wandb")  # W&B's own history, for `wandb sync`
    records = record_file.read_bytes()
    assert b"batch_size" in records and b"loss" in records and b"0.75" in records


@pytest.mark.parametrize("logger_cls, module, package", [(TensorBoardLogger, "torch.utils.tensorboard", "tensorboard"),
                                                         (WandBLogger, "wandb", "wandb")])
def test_missing_extra_hint_names_the_package(tmp_path, monkeypatch, logger_cls, module, package):
    # PyPI's "torchft" is another project: a hint must never say `pip install 'torchft[...]'`.
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install {package} \(or, in a torchft clone, "
                                          rf"pip install -e \"\.\[{package}\]\"\)") as info:
        logger_cls(log_dir=str(tmp_path))
    assert "'torchft[" not in str(info.value)
