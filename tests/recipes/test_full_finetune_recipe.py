"""End-to-end runs of recipes/full_finetune_single_device.py on tiny models (CPU), and bad input."""
import subprocess
import sys

import pytest
import torch

from torchft._recipes import full_finetune_single_device as recipe
from torchft.checkpoint import load_hf_checkpoint
from torchft.models import from_hf_config
from torchft.training import steps
from torchft.training.steps import NonFiniteLossError

from ._finetune import restore_torch_threads, TINY, TINY_NF4, make_base, make_data, read_metrics, tiny_config, train_losses, val_losses


_threads = pytest.fixture(autouse=True)(restore_torch_threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("full_base"))


def test_loss_decreases_and_output_loads_in_transformers(tmp_path, base):
    from transformers import AutoModelForCausalLM

    recipe.main(tiny_config("full", tmp_path, base, ["max_steps=6", "eval_every_n_steps=6"]))
    val = val_losses(tmp_path / "out")
    assert val[6] < 0.8 * val[0]
    step = tmp_path / "out" / "step_6"
    ours = from_hf_config(step)
    ours.load_state_dict(load_hf_checkpoint(step))
    tokens = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(step).eval()(tokens).logits
        torch.testing.assert_close(ours(tokens), theirs, rtol=1e-4, atol=1e-4)
        before = AutoModelForCausalLM.from_pretrained(base).eval()(tokens).logits
    assert not torch.allclose(before, theirs, atol=1e-3)


def test_gradient_accumulation_4x1_equals_1x4(tmp_path, base):
    runs = {}
    for name, bs, accum in (("1x4", 4, 1), ("4x1", 1, 4)):
        cfg = tiny_config("full", tmp_path / name, base, [f"batch_size={bs}", f"gradient_accumulation_steps={accum}",
                                                          "max_steps=3", "~validation_dataset", "clip_grad_norm=1e9"])
        recipe.main(cfg)
        runs[name] = read_metrics(tmp_path / name / "out")
    for a, b in zip(runs["1x4"], runs["4x1"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_optimizer_in_backward_resume_is_exact(tmp_path, base):
    common = ["max_steps=4", "save_every_n_steps=2", "optimizer_in_backward=true", "clip_grad_norm=null",
              "~validation_dataset"]
    recipe.main(tiny_config("full", tmp_path / "a", base, common))
    recipe.main(tiny_config("full", tmp_path / "b", base,
                            common + [f"resume_from_checkpoint={tmp_path / 'a' / 'out' / 'step_2'}"]))
    expected, got = train_losses(tmp_path / "a" / "out"), train_losses(tmp_path / "b" / "out")
    assert list(got) == [3, 4] and [got[3], got[4]] == [expected[3], expected[4]]
    final = [load_hf_checkpoint(tmp_path / run / "out" / "step_4") for run in ("a", "b")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_optimizer_in_backward_refuses_accumulation(tmp_path, base):
    cfg = tiny_config("full", tmp_path, base, ["optimizer_in_backward=true", "gradient_accumulation_steps=2"])
    with pytest.raises(ValueError, match="optimizer_in_backward=true needs gradient_accumulation_steps=1"):
        recipe.main(cfg)


def test_bf16_learns_like_fp32_with_and_without_optimizer_in_backward(tmp_path, base):
    # lr 3e-5 (a real full fine-tune's): round-to-nearest bf16 AdamW kept about 30% of the fp32 run's drop
    # (a change of the gradient scale mid-run, which bf16 moments rounded to nearest did not follow, is
    # checked on the optimizer itself: tests/training/test_optim.py, the gradient-scale drop)
    drops = {}
    for name, extra in (("fp32", ["dtype=fp32"]), ("bf16", ["dtype=bf16"]),
                        ("bf16_in_backward", ["dtype=bf16", "optimizer_in_backward=true", "clip_grad_norm=null"])):
        recipe.main(tiny_config("full", tmp_path / name, base, ["optimizer.lr=3e-5", "max_steps=8",
                                                                "eval_every_n_steps=8", *extra]))
        val = val_losses(tmp_path / name / "out")
        drops[name] = val[0] - val[8]
    assert drops["fp32"] > 0.1
    assert drops["bf16"] >= 0.8 * drops["fp32"] and drops["bf16_in_backward"] >= 0.8 * drops["fp32"], drops


@pytest.mark.parametrize("in_backward", [False, True])
def test_an_inf_gradient_with_a_finite_loss_is_caught_before_the_next_save(tmp_path, base, monkeypatch, in_backward):
    real_forward_backward = steps.forward_backward
    calls = []

    def poisoned(model, *args, **kwargs):  # step 3: one gradient becomes inf, the loss stays finite
        calls.append(1)
        handle = model.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * float("inf")) if len(calls) == 3 else None
        try:
            return real_forward_backward(model, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(steps, "forward_backward", poisoned)
    options = ["optimizer_in_backward=true", "clip_grad_norm=null"] if in_backward else []
    cfg = tiny_config("full", tmp_path, base, ["max_steps=6", "save_every_n_steps=2", "log_every_n_steps=4",
                                               "~validation_dataset", *options])
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is inf \(loss \d+\.\d+\) at step 3: training stopped"
                                                 r".* the last good checkpoint is .*step_2"):
        recipe.main(cfg)
    # read back at step 4 (a logging and saving step): step 4 was never saved
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_2"]
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == []  # step 4's metrics were not logged either
    assert torch.isfinite(load_hf_checkpoint(tmp_path / "out" / "step_2")["layers.0.mlp.down_proj.weight"]).all()


# ---------------------------------------------------------------------------------------------- bad input
def test_batch_size_zero(tmp_path, base):
    with pytest.raises(ValueError, match=r"batch_size \(0\) must be a positive integer"):
        recipe.main(tiny_config("full", tmp_path, base, ["batch_size=0"]))


def test_unwritable_output_dir_is_refused_before_training(tmp_path, base):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config("full", tmp_path, base, [f"output_dir={blocker / 'out'}"])
    with pytest.raises(ValueError, match=r"output_dir \(.*a_file/out\) is not writable: .*a_file is not a folder"):
        recipe.main(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["max_steps=-1"], r"^max_steps \(-1\) must be a positive integer$"),
    (["max_steps=abc", "epochs=0"], r"^max_steps \(abc\) must be a positive integer; epochs \(0\) must be a number > 0$"),
    (["checkpointer.checkpoint_dir=MISSING"], r"/missing: checkpoint folder does not exist"),
    (["+lr_scheduler.num_training_steps=3", "+loss.compile=true"],
     r"^lr_scheduler.num_training_steps is set by the recipe from max_steps/epochs; remove it; "
     r"loss.compile is set by the recipe from the top-level compile; remove it$"),
], ids=["negative_max_steps", "max_steps_not_a_number", "missing_checkpoint", "keys_the_recipe_sets"])
def test_a_refused_start_names_the_key_and_leaves_nothing_behind(tmp_path, base, overrides, message):
    overrides = [o.replace("MISSING", str(tmp_path / "missing")) for o in overrides]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        recipe.main(tiny_config("full", tmp_path, base, overrides))
    assert not (tmp_path / "out").exists()  # not even an output_dir holding a config


def test_checkpoint_of_another_architecture(tmp_path, base):
    other = make_base(tmp_path / "other", TINY_NF4)
    cfg = tiny_config("full", tmp_path, base, [f"model.path_or_dict={other}"])
    with pytest.raises(ValueError, match=r"checkpoint_dir \(.*\) holds another architecture than the config's model "
                                         r"\(model vs checkpoint: num_kv_heads 4 vs 2, embed_dim 128 vs 64"):
        recipe.main(cfg)


def test_tokenizer_vocab_larger_than_the_model(tmp_path):
    small_vocab = make_base(tmp_path / "small", dict(TINY, vocab_size=512))
    cfg = tiny_config("full", tmp_path, small_vocab)
    with pytest.raises(ValueError, match=r"vocabulary of 1024 tokens, larger than the model's vocab_size \(512\)"):
        recipe.main(cfg)


def test_config_key_typo_is_one_line_with_a_suggestion(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torchft.cli.main", "run", "full_finetune_single_device", "--config",
         "quickstart/full_single_device", f"output_dir={tmp_path}", "max_step=3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_step" in lines[0] and "max_steps" in lines[0]
    assert not list(tmp_path.glob("step_*"))


def test_a_run_logs_a_short_config_summary_not_the_whole_config(tmp_path, base):
    # an error after the config is saved (a loss that turns NaN): it stays visible under the two summary
    # lines, not under a screen of YAML
    train, _ = make_data(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torchft.cli.main", "run", "full_finetune_single_device", "--config",
         "quickstart/full_single_device", f"output_dir={out}", "~base_model", f"checkpointer.checkpoint_dir={base}",
         f"dataset.data_files={train}", "~validation_dataset", "sample_prompts=null", "progress_bar=false",
         "batch_size=4", "max_steps=3", "optimizer.lr=1e30"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    summary = next(i for i, line in enumerate(lines) if "torchft: config: " in line)
    assert f"output_dir={out}" in lines[summary]
    assert lines[summary + 1:-1] == [f"  resolved config in {out}/torchft_config.yaml (printed in full with --debug)"]
    assert lines[-1].startswith("tune: error: NonFiniteLossError: loss is nan at step 2")
    assert "metric_logger:" in (out / "torchft_config.yaml").read_text()  # the whole config, on disk
