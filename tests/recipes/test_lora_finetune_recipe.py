"""End-to-end runs of recipes/lora_finetune_single_device.py on tiny models (CPU)."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from torchft._recipes import lora_finetune_single_device as recipe
from torchft.training import steps
from torchft.training.steps import NonFiniteLossError

from ._finetune import (PAST_THE_LAST_STEP, SCHEDULE_CHANGED, TINY_NF4, fresh_schedule_lrs, make_base, read_metrics,
                        restore_torch_threads, tiny_config, train_losses, val_losses)


_threads = pytest.fixture(autouse=True)(restore_torch_threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("lora_base"))


def test_loss_decreases_and_outputs_load_in_transformers_and_peft(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = tiny_config("lora", tmp_path, base, ["max_steps=8", "eval_every_n_steps=8"])
    recipe.main(cfg)
    out = tmp_path / "out"
    val = val_losses(out)
    assert val[8] < 0.8 * val[0]
    losses = train_losses(out)
    assert sum(list(losses.values())[-2:]) < sum(list(losses.values())[:2])

    step = out / "step_8"
    assert {"model.safetensors", "config.json", "tokenizer.model", "training_state.pt"} <= {p.name for p in step.iterdir()}
    adapter = step / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    tokens = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    # the merged weights alone, in a plain transformers model
    merged = LlamaForCausalLM(LlamaConfig.from_pretrained(step)).eval()
    merged.load_state_dict(load_file(step / "model.safetensors"), strict=False)  # lm_head is tied
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    auto = AutoModelForCausalLM.from_pretrained(step).eval()
    untrained = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        merged_logits = merged(tokens).logits
        torch.testing.assert_close(with_adapter(tokens).logits, merged_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(auto(tokens).logits, merged_logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(untrained(tokens).logits, merged_logits, atol=1e-3)  # the adapter did something


def test_gradient_accumulation_4x1_equals_1x4(tmp_path, base):
    runs = {}
    for name, bs, accum in (("1x4", 4, 1), ("4x1", 1, 4)):
        cfg = tiny_config("lora", tmp_path / name, base,
                          [f"batch_size={bs}", f"gradient_accumulation_steps={accum}", "max_steps=3", "dtype=fp32",
                           "~validation_dataset", "clip_grad_norm=1e9"])  # no clipping; the norm is logged
        recipe.main(cfg)
        runs[name] = read_metrics(tmp_path / name / "out")
    assert [m["step"] for m in runs["1x4"]] == [1, 2, 3]
    for a, b in zip(runs["1x4"], runs["4x1"]):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)  # steps 2, 3 also check the updated weights
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, base):
    full = tiny_config("lora", tmp_path / "full", base, ["max_steps=6", "save_every_n_steps=3", "model.lora_dropout=0.1"])
    recipe.main(full)
    expected = train_losses(tmp_path / "full" / "out")
    # a second run that resumes from the first one's step 3 (dropout masks, data order and LR must continue)
    resumed = tiny_config("lora", tmp_path / "resumed", base,
                          ["max_steps=6", "save_every_n_steps=3", "model.lora_dropout=0.1",
                           f"resume_from_checkpoint={tmp_path / 'full' / 'out' / 'step_3'}"])
    recipe.main(resumed)
    got = train_losses(tmp_path / "resumed" / "out")
    assert list(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]  # exact, fp32 on CPU
    final = [load_file(tmp_path / run / "out" / "step_6" / "adapter" / "adapter_model.safetensors")
             for run in ("full", "resumed")]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key])


class SignalAtStep:
    """A metric logger for tests that sends a signal to this process (or corrupts a weight) at a step."""

    def __init__(self, step: int, action: str):
        self.step, self.action = step, action
        self.model = None

    def log_config(self, config):
        pass

    def log(self, metrics, step):
        if step == self.step and "loss" in metrics:
            if self.action == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)

    def close(self):
        pass


def test_sigterm_saves_a_resumable_checkpoint_then_latest_resumes(tmp_path, base):
    cfg = tiny_config("lora", tmp_path, base, ["max_steps=5", "~validation_dataset", "metric_logger._component_="
                                               f"{__name__}.SignalAtStep", "+metric_logger.step=2",
                                               "+metric_logger.action=sigterm", "~metric_logger.log_dir"])
    with pytest.raises(SystemExit) as stopped:
        recipe.main(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM  # as a shell reports a process ended by SIGTERM
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2"]
    assert (out / "step_2" / "training_state.pt").is_file()
    cfg = tiny_config("lora", tmp_path, base, ["max_steps=5", "~validation_dataset", "resume_from_checkpoint=latest"])
    recipe.main(cfg)
    assert list(train_losses(out)) == [3, 4, 5]
    assert (out / "step_5").is_dir()
    # the run is finished: resuming it again refuses, saying how to continue
    with pytest.raises(ValueError, match=r"^step 5 is already the last one \(this run has 5 steps\): nothing to "
                                         r"train; to continue, raise max_steps \(e\.g\. max_steps=10\)$"):
        recipe.main(cfg)
    past = tiny_config("lora", tmp_path, base, ["max_steps=3", "~validation_dataset", "resume_from_checkpoint=latest"])
    with pytest.raises(ValueError, match=r"checkpoint is at step 5, past this run's last step \(3, from max_steps "
                                         r"/ epochs\): raise max_steps above 5"):
        recipe.main(past)


def test_a_save_or_sigterm_at_an_epochs_last_step_resumes_exactly(tmp_path, base):
    # 32 rows, batch 4, 2 micro-batches per step: 4 steps per epoch, 12 in 3 epochs
    common = ["max_steps=null", "epochs=3", "gradient_accumulation_steps=2", "model.lora_dropout=0.1",
              "~validation_dataset"]
    recipe.main(tiny_config("lora", tmp_path / "full", base,
                            [*common, "save_every_n_steps=4", "checkpointer.keep_last_n=null"]))
    full = tmp_path / "full" / "out"
    state = torch.load(full / "step_4" / "training_state.pt", weights_only=True)["dataloader"]
    assert (state["epoch"], state["position"]) == (1, 0)  # the next batch to draw: epoch 1's first
    # resumed from the save at the end of epoch 1
    recipe.main(tiny_config("lora", tmp_path / "saved", base, [*common, f"resume_from_checkpoint={full / 'step_4'}"]))
    # stopped by SIGTERM at the end of epoch 2, then resumed from the folder it saved
    stop = ["metric_logger._component_=" f"{__name__}.SignalAtStep", "+metric_logger.step=8",
            "+metric_logger.action=sigterm", "~metric_logger.log_dir"]
    with pytest.raises(SystemExit):
        recipe.main(tiny_config("lora", tmp_path / "stopped", base, [*common, *stop]))
    recipe.main(tiny_config("lora", tmp_path / "stopped", base, [*common, "resume_from_checkpoint=latest"]))
    expected = train_losses(full)
    adapter = lambda run: load_file(tmp_path / run / "out" / "step_12" / "adapter" / "adapter_model.safetensors")
    for run, first in (("saved", 5), ("stopped", 9)):
        got = train_losses(tmp_path / run / "out")
        assert got == {step: expected[step] for step in range(first, 13)}  # exact, fp32 on CPU
        assert all(torch.equal(value, adapter("full")[key]) for key, value in adapter(run).items())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, base, monkeypatch):
    real_forward_backward = steps.forward_backward
    calls = []

    def poisoned(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 3: a weight blows up
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return real_forward_backward(model, *args, **kwargs)

    monkeypatch.setattr(steps, "forward_backward", poisoned)
    cfg = tiny_config("lora", tmp_path, base, ["max_steps=5", "save_every_n_steps=2", "~validation_dataset"])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3: training stopped .* last good checkpoint is .*step_2"):
        recipe.main(cfg)
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_2"]


def test_out_of_memory_names_the_memory_settings(tmp_path, base, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(steps, "forward_backward", out_of_memory)
    cfg = tiny_config("lora", tmp_path, base, ["~validation_dataset"])
    with pytest.raises(MemoryError, match=r"out of GPU memory at step 1 \(batch_size=4.*enable_activation_checkpointing"):
        recipe.main(cfg)


def test_dora_runs_and_peft_loads_it(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("lora", tmp_path, base, ["max_steps=2", "model.use_dora=true", "~validation_dataset"])
    recipe.main(cfg)
    step = tmp_path / "out" / "step_2"
    tokens = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(step)(tokens).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), step / "adapter")
        torch.testing.assert_close(peft_model(tokens).logits, merged, rtol=1e-4, atol=1e-4)


def test_qlora_runs_on_cpu_in_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    base = make_base(root, TINY_NF4)
    cfg = tiny_config("lora", root, base, ["max_steps=2", "+model.quantize_base=true", "dtype=bf16",
                                           "~validation_dataset", "enable_activation_checkpointing=true"])
    recipe.main(cfg)
    losses = train_losses(root / "out")
    assert list(losses) == [1, 2] and all(loss == loss for loss in losses.values())
    merged = load_file(root / "out" / "step_2" / "model.safetensors")
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].dtype  # merged onto the original weights


def test_packed_dataset_trains(tmp_path, base):
    cfg = tiny_config("lora", tmp_path, base, ["max_steps=3", "~validation_dataset", "+dataset.packed=true",
                                               "+dataset.max_seq_len=128"])
    recipe.main(cfg)
    losses = train_losses(tmp_path / "out")
    assert list(losses) == [1, 2, 3] and losses[3] < losses[1]


@pytest.mark.gpu
def test_cuda_bf16_compile_checkpointing_offloading(tmp_path, base, monkeypatch):
    from torchft.training import activations

    monkeypatch.setattr(activations, "OFFLOAD_MIN_BYTES", 1024)  # the tiny model's layer inputs are KiBs
    cfg = tiny_config("lora", tmp_path, base, ["max_steps=3", "device=cuda", "dtype=bf16", "compile=true",
                                               "enable_activation_checkpointing=true",
                                               "enable_activation_offloading=true", "loss.num_chunks=4"])
    recipe.main(cfg)
    assert activations._offloaders[torch.device("cuda", 0)].offloaded_bytes > 0
    metrics = read_metrics(tmp_path / "out")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(m["peak_memory_alloc_gib"] > 0 for m in metrics if "loss" in m)


def test_epoch_based_run_and_wandb_offline_logging(tmp_path, base, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (torchft[wandb])")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # 32 training rows, batch 4, 2 micro-batches per step: one epoch is 4 optimizer steps
    cfg = tiny_config("lora", tmp_path, base, [
        "max_steps=null", "epochs=1", "gradient_accumulation_steps=2", "eval_every_n_steps=4",
        "metric_logger._component_=torchft.training.metric_logging.WandBLogger", "+metric_logger.mode=offline",
        "+metric_logger.project=torchft-test", f"metric_logger.log_dir={tmp_path / 'wandb_logs'}"])
    recipe.main(cfg)
    (run_dir,) = (tmp_path / "wandb_logs" / "wandb").glob("offline-run-*")
    lines = [json.loads(line) for line in (run_dir / "files" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in lines if "val_loss" in m] == [0, 4]
    config = json.loads((run_dir / "files" / "config.json").read_text())
    assert config["epochs"] == 1 and config["output_dir"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "step_4" / "training_state.pt").is_file()


def test_ctrl_c_through_tune_run_saves_then_exits_130(tmp_path, base):
    import subprocess
    import sys
    import time

    from ._finetune import make_data

    train, _ = make_data(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchft.cli.main", "run", "lora_finetune_single_device", "--config",
         "quickstart/lora_single_device", "~base_model", f"checkpointer.checkpoint_dir={base}", f"output_dir={out}",
         "dataset.source=json", f"dataset.data_files={train}", "~validation_dataset", "max_steps=100000", "save_every_n_steps=100000",
         "progress_bar=false", "sample_prompts=null"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    (saved,) = out.glob("step_*")
    assert (saved / "training_state.pt").is_file() and (saved / "adapter" / "adapter_model.safetensors").is_file()
    assert f"continue with resume_from_checkpoint={saved}" in stderr


# ---------------------------------------------------------------------------------------------- runs never mix
def test_a_fresh_run_into_a_used_output_dir_refuses_unless_overwritten(tmp_path, base):
    common = ["~validation_dataset", "save_every_n_steps=1"]
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=2", *common]))
    saved = {name: (tmp_path / "out" / name).read_bytes() for name in ("torchft_config.yaml", "logs/config.json")}
    with pytest.raises((ValueError, FileExistsError),
                       match=r"output_dir \(.*out\) already holds step_1, step_2 from an earlier run: "
                             r"continue it with resume_from_checkpoint=latest, delete its step "
                             r"folders with overwrite_output_dir=true, or choose another output_dir"):
        recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=1", "optimizer.lr=5e-3", *common]))
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_1", "step_2"]  # nothing lost
    # and nothing written: the finished run's saved config is still its own
    assert {name: (tmp_path / "out" / name).read_bytes() for name in saved} == saved
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=1", "overwrite_output_dir=true", *common]))
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_1"]
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1]  # the earlier run's lines are gone too


def test_resume_from_an_earlier_step_logs_each_step_once(tmp_path, base):
    common = ["~validation_dataset", "save_every_n_steps=2"]
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=4", *common]))
    first = train_losses(tmp_path / "out")
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=4", *common,
                                                     f"resume_from_checkpoint={tmp_path / 'out' / 'step_2'}"]))
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3, 4]
    assert train_losses(tmp_path / "out") == first  # and the resumed steps reproduce the earlier ones


def test_a_resume_from_an_earlier_step_sets_the_abandoned_folders_aside(tmp_path, base, caplog):
    from torchft.checkpoint import resolve_resume_dir

    out = tmp_path / "out"
    adapter = lambda folder: (folder / "adapter" / "adapter_model.safetensors").read_bytes()
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=4", "save_every_n_steps=2", "~validation_dataset"]))
    saved_by_a = adapter(out / "step_4")
    # run B resumes A's step_2 with a longer schedule (other weights from step 3 on) and keeps 2 folders
    with caplog.at_level("WARNING", logger="torchft"):
        recipe.main(tiny_config("lora", tmp_path, base, [
            "max_steps=5", "save_every_n_steps=1", "checkpointer.keep_last_n=2", "~validation_dataset",
            f"resume_from_checkpoint={out / 'step_2'}"]))
    (aside,) = out.glob("abandoned_*")
    assert [r.getMessage() for r in caplog.records if "abandons" in r.getMessage()] == [
        f"resuming from step 2: moved step_4, saved after it by the run this one abandons, to {aside} (kept; "
        "keep_last_n and resume_from_checkpoint=latest see only this run's step folders)"]
    assert sorted(p.name for p in out.glob("step_*")) == ["step_4", "step_5"]  # B's: pruning saw only them
    assert resolve_resume_dir("latest", out) == out / "step_5"
    assert [p.name for p in aside.iterdir()] == ["step_4"] and adapter(aside / "step_4") == saved_by_a
    assert adapter(out / "step_4") != saved_by_a


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path, base, caplog):
    common = ["~validation_dataset", "save_every_n_steps=2", "lr_scheduler.name=linear"]
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=4", *common]))
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=8", *common, "resume_from_checkpoint=latest"]))
    logged = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "out") if "lr" in m}
    expected = fresh_schedule_lrs("linear", 8, 1e-2)
    assert [logged[k] for k in range(5, 9)] == pytest.approx([expected[k] for k in range(5, 9)])
    assert logged[5] > 0  # the old schedule had ended at step 4 (LR 0 from there on)
    assert SCHEDULE_CHANGED.format(saved=4) in caplog.text


def test_resume_past_the_last_step_is_refused(tmp_path, base):
    common = ["~validation_dataset", "save_every_n_steps=2"]
    recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=4", *common]))
    saved = (tmp_path / "out" / "torchft_config.yaml").read_text()
    with pytest.raises(ValueError, match=PAST_THE_LAST_STEP.format(step=4, last=2)):
        recipe.main(tiny_config("lora", tmp_path, base, ["max_steps=2", *common, "resume_from_checkpoint=latest"]))
    assert (tmp_path / "out" / "torchft_config.yaml").read_text() == saved  # the refused run wrote nothing


def test_an_epoch_run_never_borrows_batches_from_the_next_epoch(tmp_path, base):
    # 32 rows, batch 4: 8 batches; 3 per step -> steps of 3, 3 and 2 batches
    cfg = tiny_config("lora", tmp_path, base, ["max_steps=null", "epochs=1", "gradient_accumulation_steps=3",
                                               "~validation_dataset"])
    recipe.main(cfg)
    metrics = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    state = torch.load(tmp_path / "out" / "step_3" / "training_state.pt", weights_only=True)
    assert (state["dataloader"]["epoch"], state["dataloader"]["position"]) == (1, 0)  # nothing of epoch 1 used
    assert all(m["tokens"] > m["target_tokens"] > 0 for m in metrics)  # all tokens, and those with a loss
