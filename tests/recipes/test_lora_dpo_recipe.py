"""End-to-end runs of recipes/lora_dpo_single_device.py on a tiny model (CPU)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from torchft.config import load_config

from ._finetune import (assert_resume_from_step_2_of_4_is_exact, make_base, read_metrics, restore_torch_threads,
                        train_losses)

_threads = pytest.fixture(autouse=True)(restore_torch_threads)
ROOT = Path(__file__).resolve().parents[2]


def _recipe():
    spec = importlib.util.spec_from_file_location("lora_dpo_single_device", ROOT / "recipes" / "lora_dpo_single_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("dpo_base"))


QUICKSTART = str(ROOT / "recipes" / "configs" / "quickstart" / "lora_dpo_single_device.yaml")


def dpo_config(out: Path, base: Path, overrides=()):
    return load_config(QUICKSTART, [
        "~base_model", f"output_dir={out}", f"checkpointer.checkpoint_dir={base}", "progress_bar=false",
        "batch_size=4", "optimizer.lr=3e-3", "lr_scheduler.num_warmup_steps=0", "save_every_n_steps=100", *overrides])


def test_quickstart_dpo_raises_reward_accuracy_on_held_out_pairs_and_writes_step_folders(tmp_path):
    """The quickstart as shipped (its pretrained tiny base), 40 of its 60 steps: docs/preference.md's figures."""
    _recipe().main(load_config(QUICKSTART, [f"output_dir={tmp_path / 'out'}", f"base_model.path={tmp_path / 'base'}",
                                            "progress_bar=false", "max_steps=40"]))
    val = {m["step"]: m for m in read_metrics(tmp_path / "out") if "val_loss" in m}
    assert val[0]["val_loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at the start
    assert val[40]["val_rewards/accuracies"] >= 0.55  # of 100 held-out pairs (0 at step 0: no reward yet); 0.59 measured
    assert val[40]["val_loss"] < 0.6 and val[40]["val_rewards/margins"] > 0.3
    step = tmp_path / "out" / "step_40"
    assert {"model.safetensors", "config.json", "training_state.pt"} <= {p.name for p in step.iterdir()}
    assert {p.name for p in (step / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    train = [m for m in read_metrics(tmp_path / "out") if "rewards/accuracies" in m]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "loss"} <= set(train[0])


def test_resume_reproduces_the_uninterrupted_run_and_a_used_output_dir_is_refused(tmp_path, base):
    recipe = _recipe()
    recipe.main(dpo_config(tmp_path / "full", base, ["max_steps=4", "save_every_n_steps=2", "validation_dataset=null"]))
    recipe.main(dpo_config(tmp_path / "resumed", base, ["max_steps=4", "save_every_n_steps=2",
                                                        "validation_dataset=null",
                                                        f"resume_from_checkpoint={tmp_path / 'full' / 'step_2'}"]))
    assert_resume_from_step_2_of_4_is_exact(tmp_path / "full", tmp_path / "resumed")
    with pytest.raises(Exception, match="already holds step_2, step_4 from an earlier run"):
        recipe.main(dpo_config(tmp_path / "full", base, ["max_steps=4"]))


def _full_recipe():
    spec = importlib.util.spec_from_file_location("full_dpo_single_device", ROOT / "recipes" / "full_dpo_single_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_precomputed_reference_log_probs_equal_the_frozen_copys_and_resume_exactly(tmp_path, base, monkeypatch):
    """Full DPO with ``reference: precomputed``: every step's loss and metrics, and the validation metrics,
    are those the frozen reference copy gives (within 1e-6); a run resumed from step 2 recomputes the tables
    and continues exactly; an unknown ``reference`` is refused."""
    from safetensors.torch import load_file

    from torchft.data import _assets

    rows = (Path(_assets.ASSETS_DIR) / "quickstart_preference_train.jsonl").read_text().splitlines()
    (tmp_path / "dataset.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (tmp_path / "validation_dataset.jsonl").write_text("\n".join(rows[24:29]) + "\n")
    data = [f"{k}={v}" if v is not None else k for node in ("dataset", "validation_dataset") for k, v in (
        (f"{node}._component_", "torchft.data.preference_dataset"), (f"~{node}.split", None),
        (f"+{node}.source", "json"), (f"+{node}.data_files", tmp_path / f"{node}.jsonl"))]
    full = str(ROOT / "recipes" / "configs" / "quickstart" / "full_dpo_single_device.yaml")
    common = ["~base_model", f"checkpointer.checkpoint_dir={base}", "progress_bar=false", "batch_size=4", "max_steps=4",
              "save_every_n_steps=2", "eval_every_n_steps=4", "optimizer.lr=1e-3", "lr_scheduler.num_warmup_steps=0",
              *data]
    recipe = _full_recipe()
    recipe.main(load_config(full, [*common, f"output_dir={tmp_path / 'frozen'}"]))
    recipe.main(load_config(full, [*common, f"output_dir={tmp_path / 'pre'}", "+reference=precomputed"]))
    frozen, pre = read_metrics(tmp_path / "frozen"), read_metrics(tmp_path / "pre")
    assert [m["step"] for m in pre] == [m["step"] for m in frozen] and len(pre) > 4
    for a, b in zip(frozen, pre):
        for name in [k for k in a if k == "loss" or k.startswith(("rewards/", "val_"))]:
            assert b[name] == pytest.approx(a[name], abs=1e-6), (a["step"], name)
    assert {m["step"] for m in pre if "loss" in m} == {1, 2, 3, 4}
    assert {m["step"] for m in pre if "val_loss" in m} == {0, 4}
    assert [m for m in pre if "val_loss" in m][-1]["val_loss"] < 0.693  # it trained (log 2 at step 0)

    from torchft.training import preference_setup

    real, calls = preference_setup.frozen_reference, []
    monkeypatch.setattr(preference_setup, "frozen_reference", lambda *a: calls.append(1) or real(*a))
    recipe.main(load_config(full, [*common, f"output_dir={tmp_path / 'resumed'}", "+reference=precomputed",
                                   f"resume_from_checkpoint={tmp_path / 'pre' / 'step_2'}"]))
    assert len(calls) == 6 + 2  # one reference forward per batch of the 24 + 5 pairs, before step 3; none per step
    losses = {run: train_losses(tmp_path / run) for run in ("pre", "resumed")}
    assert list(losses["resumed"]) == [3, 4] and all(losses["resumed"][s] == losses["pre"][s] for s in (3, 4))
    weights = [load_file(tmp_path / run / "step_4" / "model.safetensors") for run in ("pre", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ValueError, match=r"reference \(precompute\) must be 'model' .* or 'precomputed'"):
        recipe.main(load_config(full, [*common, f"output_dir={tmp_path / 'typo'}", "+reference=precompute"]))
