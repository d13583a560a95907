"""lora_dpo_distributed and full_dpo_distributed on 2 CPU ranks (gloo), against lora_dpo_single_device with the
same global batch."""
import itertools
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes._finetune import make_base, read_metrics, restore_torch_threads
from torchft.config import load_config
from torchft.data import _assets

from ._launch import launch

_threads = pytest.fixture(autouse=True)(restore_torch_threads)
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs" / "quickstart"


def _run_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _overrides(out: Path, base: Path, train: Path, val: Path, extra=()) -> list[str]:
    """4 steps of 2 x 4 pairs (global), the validation file of 5 pairs: on 2 ranks one gets a masked tail."""
    return ["~base_model", f"output_dir={out}", f"checkpointer.checkpoint_dir={base}", "progress_bar=false",
            *[f"{key}={value}" if value is not None else key for node, path in (("dataset", train), ("validation_dataset", val)) for key, value in (
                (f"{node}._component_", "torchft.data.preference_dataset"), (f"~{node}.split", None),
                (f"+{node}.source", "json"), (f"+{node}.data_files", path))],
            "shuffle=false", "batch_size=4", "gradient_accumulation_steps=2", "max_steps=4", "eval_every_n_steps=2",
            "save_every_n_steps=2", "checkpointer.keep_last_n=null", "optimizer.lr=3e-3",
            "lr_scheduler.num_warmup_steps=0", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from torchft._recipes import full_dpo_single_device, lora_dpo_single_device

    root = tmp_path_factory.mktemp("dpo_dist")
    base = make_base(root)
    rows = (Path(_assets.ASSETS_DIR) / "quickstart_preference_train.jsonl").read_text().splitlines()
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("\n".join(rows[:32]) + "\n")
    val.write_text("\n".join(rows[32:37]) + "\n")  # 5 pairs: rank 1's last one is a masked copy
    _run_ok(launch("lora_dpo_distributed", "quickstart/lora_dpo_distributed",
                   _overrides(root / "dist", base, train, val)))
    lora_dpo_single_device.main(load_config(str(CONFIGS / "lora_dpo_single_device.yaml"),
                                            _overrides(root / "single", base, train, val)))
    shutil.copytree(root / "dist" / "step_2", root / "resumed" / "step_2")
    _run_ok(launch("lora_dpo_distributed", "quickstart/lora_dpo_distributed", _overrides(
        root / "resumed", base, train, val, [f"resume_from_checkpoint={root / 'resumed' / 'step_2'}"])))
    # the 2-rank full run precomputes its reference log-probs (the single-device one runs the frozen copy)
    _run_ok(launch("full_dpo_distributed", "quickstart/full_dpo_distributed", _overrides(
        root / "full", base, train, val, ["max_steps=2", "optimizer.lr=1e-3", "+reference=precomputed"])))
    full_dpo_single_device.main(load_config(str(CONFIGS / "full_dpo_single_device.yaml"), _overrides(
        root / "full_single", base, train, val, ["max_steps=2", "optimizer.lr=1e-3"])))
    return root


def _metrics(out: Path, prefix: str = "") -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if prefix + "loss" in m}


NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def test_2_ranks_match_one_device_with_the_global_batch_and_a_masked_validation_tail(runs):
    dist, single = _metrics(runs / "dist"), _metrics(runs / "single")
    assert list(dist) == [1, 2, 3, 4]
    for step, name in itertools.product(dist, NAMES):
        assert dist[step][name] == pytest.approx(single[step][name], abs=1e-5), (step, name)
    dist_val, single_val = _metrics(runs / "dist", "val_"), _metrics(runs / "single", "val_")
    assert list(dist_val) == [0, 2, 4]
    assert dist_val[0]["val_loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference: log 2
    for step, name in itertools.product(dist_val, NAMES):  # the padded pair counted nothing
        assert dist_val[step]["val_" + name] == pytest.approx(single_val[step]["val_" + name], abs=1e-5)
    adapters = [load_file(runs / run / "step_4" / "adapter" / "adapter_model.safetensors") for run in ("dist", "single")]
    assert sorted(adapters[0]) == sorted(adapters[1])
    assert max(float((adapters[0][k] - adapters[1][k]).abs().max()) for k in adapters[0]) < 1e-4
    assert any(float(adapters[0][k].abs().max()) > 0 for k in adapters[0] if "lora_b" in k.lower())  # it did train


def test_resume_mid_run_equals_the_uninterrupted_run(runs):
    full, resumed = _metrics(runs / "dist"), _metrics(runs / "resumed")
    assert list(resumed) == [3, 4]
    assert [resumed[s]["loss"] for s in (3, 4)] == [full[s]["loss"] for s in (3, 4)]
    adapters = [load_file(runs / run / "step_4" / "adapter" / "adapter_model.safetensors") for run in ("dist", "resumed")]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_full_dpo_on_2_ranks_matches_one_device_from_log_2_where_its_frozen_reference_is_the_policy(runs):
    """The frozen reference copy is the input model: at step 0 it equals the policy (and the LoRA run's
    adapters-disabled reference), so the first loss is log 2 and the validation metrics are the LoRA run's;
    2 ranks then train as one device. The 2 ranks precompute the reference log-probs (each rank its batches of
    pairs, the validation tail's masked copy left out), the single device runs the frozen copy every step."""
    full, single, lora = _metrics(runs / "full"), _metrics(runs / "full_single"), _metrics(runs / "single")
    full_val, single_val = _metrics(runs / "full", "val_"), _metrics(runs / "full_single", "val_")
    lora_val = _metrics(runs / "single", "val_")
    assert full[1]["loss"] == pytest.approx(0.693147, abs=1e-5) == lora[1]["loss"]
    for name in NAMES:
        assert full_val[0]["val_" + name] == pytest.approx(lora_val[0]["val_" + name], abs=1e-6)
    for step, name in itertools.product((1, 2), NAMES):
        assert full[step][name] == pytest.approx(single[step][name], abs=1e-5), (step, name)
        assert full_val[step if step == 2 else 0]["val_" + name] == pytest.approx(
            single_val[step if step == 2 else 0]["val_" + name], abs=1e-5)
    assert full[2]["loss"] < full[1]["loss"] and full_val[2]["val_loss"] < full_val[0]["val_loss"]
    weights = [load_file(runs / run / "step_2" / "model.safetensors") for run in ("full", "full_single")]
    assert not (runs / "full" / "step_2" / "adapter").exists() and sorted(weights[0]) == sorted(weights[1])
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 1e-4
