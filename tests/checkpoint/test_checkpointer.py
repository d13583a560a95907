"""The recipes' checkpointers: step folders, training state, pruning, resume lookup, atomic saves."""
import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.checkpoint._tiny import assert_logits_close, logits, save_hf_folder, tokens
from torchft.checkpoint import (
    HFCheckpointer, latest_step_dir, load_native_checkpoint, load_training_state, resolve_resume_dir,
    save_hf_checkpoint, save_native_checkpoint, set_aside_later_steps,
)
from torchft.checkpoint.checkpointer import step_dirs
from torchft.checkpoint.validate import is_adapter_key
from torchft.models import build_from_args, from_hf_config


@pytest.fixture
def hf_dir(tmp_path):
    folder = tmp_path / "base"
    hf = save_hf_folder("llama3", folder)
    (folder / ".torchft_repo_id").write_text("acme/tiny-llama\n")
    return folder, hf


def _model(ckpt):
    with torch.device("meta"):
        model = build_from_args(ckpt.model_args)
    model.load_state_dict(ckpt.load_model_state_dict(), assign=True)
    return model.eval()


def _training_state(model, step):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model(tokens()).sum().backward()
    opt.step()
    sched.step()
    return {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "step": step,
            "dataloader": {"epoch": 0, "index": 17, "seed": 5}, "rng": {"torch": torch.get_rng_state(),
            "python": random.getstate()}}


def test_save_step_folders_load_back_and_prune(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base, hf = hf_dir
    ckpt = HFCheckpointer(base, tmp_path / "out", keep_last_n=2)
    assert ckpt.model_args.num_kv_heads == 2 and ckpt.base_model_name_or_path == "acme/tiny-llama"
    model = _model(ckpt)
    x = tokens()
    assert_logits_close(logits(model, x), logits(hf, x))

    for step in (10, 20, 30):
        state = _training_state(model, step)
        path = ckpt.save(step, model.state_dict(), training_state=state)
        assert path == tmp_path / "out" / f"step_{step}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_20", "step_30"]  # pruned after saving
    assert sorted(p.name for p in path.iterdir()) == [
        ".torchft_repo_id", "config.json", "generation_config.json", "model.safetensors", "original",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "training_state.pt"]
    assert json.loads((path / "config.json").read_text()) == json.loads((base / "config.json").read_text())

    # The weights and the training state come back as saved.
    assert latest_step_dir(tmp_path / "out") == path == ckpt.latest_step_dir()
    reloaded = ckpt.load_model_state_dict(path)
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())
    back = load_training_state(path)  # weights_only=True suffices for this state
    assert back["step"] == 30 and back["dataloader"] == state["dataloader"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and back["rng"]["python"] == state["rng"]["python"]
    assert back["lr_scheduler"] == state["lr_scheduler"]
    for (pid, s_back), s in zip(back["optimizer"]["state"].items(), state["optimizer"]["state"].values()):
        assert all(torch.equal(s_back[k], s[k]) for k in s)
    # The step folder is a drop-in transformers model.
    assert_logits_close(logits(AutoModelForCausalLM.from_pretrained(path).eval(), x), logits(model, x))


def test_resume_lookup(hf_dir, tmp_path):
    base, _ = hf_dir
    ckpt = HFCheckpointer(base, tmp_path / "out")
    out = tmp_path / "out"
    assert resolve_resume_dir(None, out) is None and resolve_resume_dir(False, out) is None
    with pytest.raises(FileNotFoundError, match="no step_<N> folder with training_state.pt to resume from"):
        resolve_resume_dir(True, out)
    model = _model(ckpt)
    ckpt.save(5, model.state_dict(), training_state={"step": 5})
    ckpt.save(9, model.state_dict())  # a final save without training state: not resumable
    (out / ".step_12.tmp-x1y2").mkdir()  # what a killed save leaves behind
    assert latest_step_dir(out) == out / "step_9"
    assert resolve_resume_dir(True, out) == resolve_resume_dir("latest", out) == out / "step_5"
    assert resolve_resume_dir(str(out / "step_5"), out) == out / "step_5"
    with pytest.raises(FileNotFoundError, match="step_9/training_state.pt: training state not found, cannot resume"):
        resolve_resume_dir(out / "step_9", out)
    with pytest.raises(ValueError, match="keep_last_n \\(0\\) must be at least 1"):
        HFCheckpointer(base, out, keep_last_n=0)


def test_a_resume_sets_the_abandoned_runs_later_folders_aside(hf_dir, tmp_path, caplog):
    base, _ = hf_dir
    out = tmp_path / "out"
    ckpt = HFCheckpointer(base, out, keep_last_n=2)
    weights = _model(ckpt).state_dict()
    for step in (2, 4, 6):  # run A
        ckpt.save(step, weights, training_state={"step": step, "run": "A"})
    assert set_aside_later_steps(out, 6) is None  # nothing after the last step
    with caplog.at_level("WARNING", logger="torchft"):
        aside = set_aside_later_steps(out, 4)  # run B resumes from A's step_4
    assert aside.parent == out and aside.name.startswith("abandoned_")
    assert [r.getMessage() for r in caplog.records] == [
        f"resuming from step 4: moved step_6, saved after it by the run this one abandons, to {aside} (kept; "
        "keep_last_n and resume_from_checkpoint=latest see only this run's step folders)"]
    for step in (5, 6):  # run B
        ckpt.save(step, weights, training_state={"step": step, "run": "B"})
    assert [n for n, _ in step_dirs(out)] == [5, 6]  # pruning saw B's folders (and A's step_4) only
    assert load_training_state(resolve_resume_dir("latest", out))["run"] == "B"
    assert load_training_state(aside / "step_6") == {"step": 6, "run": "A"}  # set aside, intact
    assert set_aside_later_steps(out, 5) != aside  # a later resume: its own folder
    assert sorted(p.name for p in aside.iterdir()) == ["step_6"]


def test_failed_save_leaves_previous_steps_and_nothing_complete_looking(hf_dir, tmp_path, monkeypatch):
    import torchft.checkpoint.hf as hf_module

    base, _ = hf_dir
    ckpt = HFCheckpointer(base, tmp_path / "out", keep_last_n=1, max_shard_size="60KB")
    model = _model(ckpt)
    first = ckpt.save(1, model.state_dict(), training_state={"step": 1})
    real_save_file = hf_module.save_file

    def failing_save_file(tensors, path, metadata=None):
        if path.name.startswith("model-00002"):  # the disk fills up while writing the second shard
            raise OSError(28, "No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(2, model.state_dict(), training_state={"step": 2})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_1"]  # temp folder removed, nothing pruned
    assert latest_step_dir(tmp_path / "out") == first
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(model.state_dict(), tmp_path / "export", max_shard_size="60KB")
    assert not (tmp_path / "export").exists()


def test_killed_save_leaves_only_a_hidden_temporary_folder(hf_dir, tmp_path, caplog):
    """A process killed mid-save (no cleanup runs) leaves no step folder; the next save removes what it left."""
    base, _ = hf_dir
    script = textwrap.dedent(f"""
        import os, torch
        import torchft.checkpoint.hf as hf
        from torchft.checkpoint import HFCheckpointer
        real = hf.save_file
        def dying(tensors, path, metadata=None):
            if path.name.startswith("model-00002"):
                os._exit(9)
            real(tensors, path, metadata=metadata)
        hf.save_file = dying
        ckpt = HFCheckpointer({str(base)!r}, {str(tmp_path / "out")!r}, max_shard_size="60KB")
        ckpt.save(3, ckpt.load_model_state_dict(), training_state={{"step": 3}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == 9, result.stderr.decode()[-2000:]
    leftovers = [p.name for p in (tmp_path / "out").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step_3.tmp-")
    assert latest_step_dir(tmp_path / "out") is None
    with pytest.raises(FileNotFoundError, match="no step_<N> folder"):
        resolve_resume_dir(True, tmp_path / "out")
    ckpt = HFCheckpointer(base, tmp_path / "out")
    with caplog.at_level("WARNING", logger="torchft"):
        ckpt.save(4, ckpt.load_model_state_dict(), training_state={"step": 4})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_4"]
    assert [r.getMessage() for r in caplog.records] == [
        f"removed {leftovers[0]} from {tmp_path / 'out'}: the unfinished save of an interrupted run (never resumable)"]


def test_adapter_is_saved_in_its_own_folder_next_to_the_weights(hf_dir, tmp_path):
    base, _ = hf_dir
    ckpt = HFCheckpointer(base, tmp_path / "out")
    model = from_hf_config(base, lora_attn_modules=["q_proj", "v_proj"], lora_rank=4)
    model.load_state_dict(ckpt.load_model_state_dict(), strict=False)
    base_weights = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    path = ckpt.save(4, base_weights, adapter_model=model)
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-llama" and config["r"] == 4
    assert (path / "adapter" / "adapter_model.safetensors").is_file() and (path / "model.safetensors").is_file()
    assert not (path / "adapter_config.json").exists()  # never beside the merged weights
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.lora_a.weight is an adapter weight"):
        ckpt.save(5, model.state_dict())
    assert not (tmp_path / "out" / "step_5").exists()


def test_native_single_file_round_trip(hf_dir, tmp_path, monkeypatch):
    import torchft.checkpoint.native as native

    base, _ = hf_dir
    model = from_hf_config(base, lora_attn_modules=["q_proj"], apply_lora_to_mlp=True)
    sd = model.state_dict()
    path = save_native_checkpoint(sd, tmp_path / "model.safetensors", config=model.args)
    args, loaded = load_native_checkpoint(path)
    assert args == model.args
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)

    def broken(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(native, "save_file", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_native_checkpoint({}, path, config=model.args)
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]
    assert load_native_checkpoint(path)[0] == model.args  # the previous file is intact
