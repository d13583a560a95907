"""The distributed recipes end to end: 2 CPU processes (gloo) launched by the real torchrun.

Each launch costs seconds, so every run is made once (module fixtures) and checked by several tests:
the same losses and weights as the single-device recipe with the global batch, step folders that
load in transformers and peft, DCP resume (bitwise at the same world size, exact after resharding).
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes._finetune import (PAST_THE_LAST_STEP, SCHEDULE_CHANGED, fresh_schedule_lrs, make_base, make_data,
                                    read_metrics, restore_torch_threads, tiny_config, train_losses, val_losses)

from ._launch import launch, single_device_overrides, tiny_overrides

_threads = pytest.fixture(autouse=True)(restore_torch_threads)

# NF4 over 2 shards: every quantized weight's element count divisible by 16384 x 2, dim 0 by 2
TINY_NF4_SHARDABLE = dict(num_layers=2, embed_dim=256, num_heads=4, num_kv_heads=4, intermediate_dim=512,
                          max_seq_len=256)


def _run_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 training rows; 7 validation rows, which 2 ranks cannot split evenly (the last is padded)."""
    root = tmp_path_factory.mktemp("dist_data")
    return make_data(root, val_rows=7)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("dist_base"))


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, base, data):
    """LoRA on 2 ranks for 6 steps (1.5 epochs: 4 steps of 2 x 2 batches per epoch), the same on one device,
    and resumes of the 2-rank run: from step_2 at 2 ranks into a copy of its folders (A's later ones marked),
    from step_4 (an epoch's last step) at 2 ranks, and from step_2 at 1 rank. The 2-rank run and the first
    resume save with async_save=true (DCP shards written in the background); the other resumes save in line."""
    from torchft._recipes import lora_finetune_single_device

    root = tmp_path_factory.mktemp("lora_runs")
    names = ("dist", "single", "resume2", "resume_epoch_end", "resume1")
    runs = {name: root / name for name in names}
    six_steps = ["max_steps=6", "checkpointer.keep_last_n=null"]
    first = _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed",
                           tiny_overrides(runs["dist"], base, *data, [*six_steps, "async_save=true"])))
    (runs["dist"] / "stdout.log").write_text(first.stdout)
    lora_finetune_single_device.main(tiny_config("lora", runs["single"], base, single_device_overrides(
        [*six_steps, f"validation_dataset.data_files={data[1]}"])))
    resumes = (("resume2", ("step_2", "step_4", "step_6"), "step_2", 2,  # keeps 2 of its saves 3, 4, 5, 6
                ["checkpointer.keep_last_n=2", "save_every_n_steps=1", "async_save=true"]),
               ("resume_epoch_end", ("step_4",), "step_4", 2, []),
               ("resume1", ("step_2",), "step_2", 1, []))
    for name, copied, start, nproc, extra in resumes:
        out = runs[name] / "out"
        for folder in copied:
            shutil.copytree(runs["dist"] / "out" / folder, out / folder)
            if folder != start:
                (out / folder / "saved_by_run_a").touch()
        result = _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed",
                                tiny_overrides(runs[name], base, *data,
                                               ["max_steps=6", *extra, f"resume_from_checkpoint={out / start}"]),
                                nproc=nproc))
        (runs[name] / "stderr.log").write_text(result.stderr)
    return {name: path / "out" for name, path in runs.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_the_distributed_quickstart_prints_samples_once_before_and_after(lora_runs):
    stdout = (lora_runs["dist"].parent / "stdout.log").read_text()
    for title in ("samples before fine-tuning:", "samples after fine-tuning:"):
        assert stdout.count(title) == 1, stdout[-2000:]  # the main process prints, the other rank only generates
    after = stdout.split("samples after fine-tuning:")[1]
    assert "'Write the word in capital letters. river' -> " in after


def test_lora_on_2_ranks_matches_one_device_with_the_global_batch(lora_runs):
    dist, single = lora_runs["dist"], lora_runs["single"]
    losses, reference = train_losses(dist), train_losses(single)
    assert list(losses) == [1, 2, 3, 4, 5, 6]
    for step in losses:
        assert abs(losses[step] - reference[step]) < 1e-5, (step, losses[step], reference[step])
    assert list(val_losses(dist)) == [0, 2, 4, 6]
    for step, value in val_losses(single).items():  # every validation sample counted once, on 2 ranks as on one
        assert abs(val_losses(dist)[step] - value) < 1e-5
    merged = lambda out: load_file(out / "step_6" / "model.safetensors")
    adapter = lambda out: load_file(out / "step_6" / "adapter" / "adapter_model.safetensors")
    assert _max_diff(merged(dist), merged(single)) < 1e-4
    assert _max_diff(adapter(dist), adapter(single)) < 1e-3  # 6 AdamW steps at lr 1e-2 on fp32 sums
    assert json.loads((dist / "step_6" / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((single / "step_6" / "adapter" / "adapter_config.json").read_text())


def _assert_loads_in_transformers_and_peft(step, base) -> None:
    """A distributed LoRA step folder: its merged model loads in transformers, its adapter in peft on the
    base, and the two compute the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert {"model.safetensors", "config.json", "tokenizer.model", "training_state.pt", "adapter",
            "distributed"} <= {p.name for p in step.iterdir()}
    tokens = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(step).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), step / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(tokens).logits, merged(tokens).logits, rtol=1e-4, atol=1e-4)


def test_distributed_step_folder_loads_in_transformers_and_peft(lora_runs, base):
    _assert_loads_in_transformers_and_peft(lora_runs["dist"] / "step_4", base)


def _dcp_state(folder) -> dict:
    """The DCP shards of a step folder, read back whole on this process, as ``{"model.x.y": value}``."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def flat(tree, prefix):
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}.{key}".lstrip(".")).items()}

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder / "distributed", f"{tmp}/state.pt")
        return flat(torch.load(f"{tmp}/state.pt", weights_only=False), "")


def test_a_background_save_writes_what_a_save_in_line_writes(lora_runs):
    """The 2-rank run saved in the background (async_save=true); its resume from step_4 saved in line, with the
    same steps 5 and 6 (bitwise): step_6's adapters and AdamW state read back from DCP are the same, bit for bit."""
    background, in_line = _dcp_state(lora_runs["dist"] / "step_6"), _dcp_state(lora_runs["resume_epoch_end"] / "step_6")
    assert sorted(background) == sorted(in_line) and any(".lora_a." in key for key in background)
    assert sum(isinstance(v, torch.Tensor) and "exp_avg" in k for k, v in background.items()) > 0
    for key, value in background.items():
        assert torch.equal(value, in_line[key]) if isinstance(value, torch.Tensor) else value == in_line[key], key
    stdout = (lora_runs["dist"].parent / "stdout.log").read_text()
    assert f"step 4: saving (in the background) {lora_runs['dist'] / 'step_4'}" in stdout
    assert not list(lora_runs["dist"].glob(".step_*"))  # every folder, the last one's too, was put in place


# from step_2 (mid-epoch) and from step_4 (an epoch's last step)
@pytest.mark.parametrize("run, first", [("resume2", 3), ("resume_epoch_end", 5)])
def test_resume_at_the_same_world_size_is_bitwise(lora_runs, run, first):
    uninterrupted, resumed = train_losses(lora_runs["dist"]), train_losses(lora_runs[run])
    assert resumed == {step: uninterrupted[step] for step in range(first, 7)}  # bitwise
    adapter = lambda out: load_file(out / "step_6" / "adapter" / "adapter_model.safetensors")
    assert _max_diff(adapter(lora_runs[run]), adapter(lora_runs["dist"])) == 0.0


def test_a_resume_from_an_earlier_step_sets_the_abandoned_folders_aside(lora_runs):
    from torchft.checkpoint import resolve_resume_dir

    out = lora_runs["resume2"]  # held A's step_2, step_4, step_6 (the last two marked); resumed from step_2
    (aside,) = out.glob("abandoned_*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_4", "step_6"]
    assert all((aside / name / "saved_by_run_a").is_file() for name in ("step_4", "step_6"))  # kept as they were
    assert sorted(p.name for p in out.glob("step_*")) == ["step_5", "step_6"]  # keep_last_n=2 of B's own
    assert resolve_resume_dir("latest", out) == out / "step_6" and not (out / "step_6" / "saved_by_run_a").exists()
    assert f"resuming from step 2: moved step_4, step_6, saved after it by the run this one abandons, to {aside}" \
        in (out.parent / "stderr.log").read_text()


def test_resume_at_another_world_size_continues_the_run(lora_runs):
    uninterrupted, resumed = train_losses(lora_runs["dist"]), train_losses(lora_runs["resume1"])
    assert list(resumed) == [3, 4, 5, 6]
    for step in resumed:  # 2 -> 1 ranks: the same samples, adapters and AdamW state, resharded
        assert abs(resumed[step] - uninterrupted[step]) < 1e-5


def test_resume_with_another_max_steps_follows_the_new_schedule_and_refuses_past_its_end(lora_runs, base, data,
                                                                                         tmp_path):
    """The rules of one device (tests/recipes: the same expectations) on 2 ranks: a longer run re-derives the
    schedule over its own total; a run shorter than the checkpoint's step is refused and writes nothing."""
    import re

    for name, max_steps in (("longer", 8), ("shorter", 4)):
        shutil.copytree(lora_runs["dist"] / "step_6", tmp_path / name / "out" / "step_6")
        result = launch("lora_finetune_distributed", "quickstart/lora_distributed", tiny_overrides(
            tmp_path / name, base, *data, [f"max_steps={max_steps}", "lr_scheduler.name=linear",
                                           "validation_dataset=null", "eval_every_n_steps=null",
                                           "resume_from_checkpoint=latest"]))
        if name == "longer":
            _run_ok(result)
            logged = {m["step"]: m["lr"] for m in read_metrics(tmp_path / name / "out") if "lr" in m}
            assert [logged[k] for k in (7, 8)] == pytest.approx([fresh_schedule_lrs("linear", 8, 1e-2)[k]
                                                                 for k in (7, 8)])
            assert result.stderr.count(SCHEDULE_CHANGED.format(saved=6)) == 1  # said once, by rank 0
        else:
            assert result.returncode == 1
            assert re.search(PAST_THE_LAST_STEP.format(step=6, last=4), result.stderr)
            assert sorted(p.name for p in (tmp_path / name / "out").iterdir()) == ["step_6"]  # nothing written


def test_a_fresh_run_into_a_used_output_dir_is_refused_before_any_work(lora_runs, base, data):
    used = lora_runs["dist"].parent  # holds out/step_2, out/step_4 and out/step_6
    saved = {name: (used / "out" / name).read_bytes() for name in ("torchft_config.yaml", "logs/config.json")}
    result = launch("lora_finetune_distributed", "quickstart/lora_distributed",
                    tiny_overrides(used, base, *data, ["seed=7"]))
    assert result.returncode == 1
    refusal = f"error: output_dir ({used / 'out'}) already holds step_2, step_4, step_6 from an earlier run: continue " \
              "it with resume_from_checkpoint=latest"
    assert result.stderr.count(refusal) == 1  # said once (by rank 0), not once per rank
    assert (used / "out" / "step_4" / "distributed" / ".metadata").is_file()  # nothing saved is lost
    # and nothing written: the finished run's saved config is still its own (seed 0, not the refused run's 7)
    assert {name: (used / "out" / name).read_bytes() for name in saved} == saved


def test_full_finetune_on_2_ranks_matches_one_device(tmp_path, base, data):
    from torchft._recipes import full_finetune_single_device

    dist, single = tmp_path / "dist", tmp_path / "single"
    # activation checkpointing recomputes each layer inside FSDP's gathered unit, and fp32 reduction of fp32
    # gradients changes nothing either: the same numbers
    result = _run_ok(launch("full_finetune_distributed", "quickstart/full_distributed",
                            tiny_overrides(dist, base, *data, ["optimizer.lr=1e-3", "enable_activation_checkpointing=true",
                                                               "fp32_reduce=true"])))
    for title in ("samples before fine-tuning:", "samples after fine-tuning:"):
        assert result.stdout.count(title) == 1  # generated on both ranks, printed by the main process
    full_finetune_single_device.main(tiny_config("full", single, base, single_device_overrides(["optimizer.lr=1e-3"])))
    losses, reference = train_losses(dist / "out"), train_losses(single / "out")
    assert max(abs(losses[s] - reference[s]) for s in reference) < 1e-5
    weights = lambda out: load_file(out / "out" / "step_4" / "model.safetensors")
    assert _max_diff(weights(dist), weights(single)) < 1e-4
    assert not (dist / "out" / "step_4" / "adapter").exists()


def _quantized_dora_matches_one_device(root, base, data, quantize_base, runs):
    """DoRA over a quantized base for 2 steps: each distributed run in ``runs`` ((name, nproc, more
    overrides); its one-device twin is ``single`` + the name's suffix after "dist<nproc>") has the
    same losses and adapters as one device (the base quantized whole then split, so every rank holds
    the rows one device would). Returns the step-2 merged weights of every run by name."""
    from torchft._recipes import lora_finetune_single_device

    extra = [f"+model.quantize_base={quantize_base}", "model.use_dora=true", "model.lora_rank=8",
             "model.lora_alpha=16", "max_steps=2", "optimizer.lr=1e-3"]
    singles = {}
    for name, nproc, more in runs:
        _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed",
                       tiny_overrides(root / name, base, *data, [*extra, *more]), nproc=nproc))
        singles["single" + name[len(f"dist{nproc}"):]] = more
    for name, more in singles.items():
        lora_finetune_single_device.main(tiny_config("lora", root / name, base, single_device_overrides([*extra, *more])))
    reference = train_losses(root / "single" / "out")
    adapter = lambda run: load_file(root / run / "out" / "step_2" / "adapter" / "adapter_model.safetensors")
    assert any("magnitude" in k for k in adapter("single"))
    for name, nproc, more in runs:
        losses = train_losses(root / name / "out")
        assert list(losses) == [1, 2]
        assert max(abs(losses[s] - reference[s]) for s in reference) < 1e-5
        assert _max_diff(adapter(name), adapter("single")) < 1e-4
    return {run: load_file(root / run / "out" / "step_2" / "model.safetensors")
            for run in [*singles, *(name for name, _, _ in runs)]}


def test_qlora_dora_on_2_ranks_matches_one_device(tmp_path_factory, data):
    """NF4 base weights quantized whole then split: the same model as on one device, DoRA magnitudes too."""
    root = tmp_path_factory.mktemp("qlora")
    onto_model = ["+checkpointer.merge_onto=model"]  # the merged export of the NF4-dequantized weights
    # 1 rank: NF4 is not sharded (FSDP2 fails on it there)
    merged = _quantized_dora_matches_one_device(root, make_base(root, TINY_NF4_SHARDABLE), data, "true",
                                                [("dist2", 2, []), ("dist1_onto_model", 1, onto_model)])
    # merged exports: onto the checkpoint's original weights, each rank its rows, as on one device (not the NF4
    # approximation); merge_onto=model keeps the dequantized variant
    assert _max_diff(merged["dist2"], merged["single"]) < 1e-4
    assert _max_diff(merged["dist1_onto_model"], merged["single_onto_model"]) < 1e-4
    assert _max_diff(merged["single"], merged["single_onto_model"]) > 1e-3  # NF4 rounding: the two differ


def test_int8_base_dora_on_2_ranks_matches_one_device(tmp_path_factory, base, data):
    """int8 rows sharded by FSDP2 (any shape), per-row scales whole on every rank: as on one device, and
    the merged export sits on the original weights there too."""
    merged = _quantized_dora_matches_one_device(tmp_path_factory.mktemp("int8"), base, data, "int8",
                                                [("dist2", 2, [])])
    assert _max_diff(merged["dist2"], merged["single"]) < 1e-4


def test_qat_lora_on_2_ranks_matches_one_device_and_resumes_across_the_switch(tmp_path, base, data):
    """LoRA with QAT (8da4w, fake quantization from step 3 on) on 2 ranks, against the same run on one
    device and a plain (no QAT) one there; then resumed at 2 ranks from step_2, across the switch."""
    from tests.training.test_qat import converted_fake_and_plain_logits
    from torchft._recipes import lora_finetune_single_device

    qat = ["+qat.scheme=8da4w", "+qat.group_size=32", "+qat.fake_quant_after_n_steps=2", "sample_prompts=null"]
    dist = tmp_path / "dist" / "out"
    _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed",
                   tiny_overrides(dist.parent, base, *data, qat)))
    _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed", tiny_overrides(
        tmp_path / "resumed", base, *data, [*qat, "validation_dataset=null", "eval_every_n_steps=null",
                                            f"resume_from_checkpoint={dist / 'step_2'}"])))
    for name, extra in (("single", qat), ("plain", [])):
        lora_finetune_single_device.main(tiny_config("lora", tmp_path / name, base, single_device_overrides(
            [*extra, f"validation_dataset.data_files={data[1]}"])))
    losses, reference, plain = (train_losses(tmp_path / name / "out") for name in ("dist", "single", "plain"))
    assert list(losses) == [1, 2, 3, 4]
    # steps 1-2 without fake quantization: the plain LoRA run's numbers, on 2 ranks as on one device
    assert max(abs(losses[s] - reference[s]) for s in (1, 2)) < 1e-5
    assert [plain[1], plain[2]] == [reference[1], reference[2]]
    # steps 3-4 with it: the adapters of 2 ranks differ from one device's by a few ulps after step 2 (merged
    # weights 3e-7 apart), enough to move some of the fake-quantized weights across an int4 rounding boundary
    # (and some activations across an int8 one); measured gaps 1.6e-3 and 2.0e-3, bound 1e-2
    assert max(abs(losses[s] - reference[s]) for s in (3, 4)) < 1e-2, (losses, reference)
    # fake quantization really on under FSDP: 7e-2 and 1.2e-1 from the plain run, far outside that bound
    assert min(abs(losses[s] - plain[s]) for s in (3, 4)) > 3e-2, (losses, plain)
    validation, val_reference = val_losses(dist), val_losses(tmp_path / "single" / "out")
    assert max(abs(validation[s] - val_reference[s]) for s in (0, 2)) < 1e-5
    assert abs(validation[4] - val_reference[4]) < 1e-2  # measured 2.9e-3
    # resumed before the switch: the uninterrupted run's steps 3-4 and adapters, bit for bit
    assert train_losses(tmp_path / "resumed" / "out") == {s: losses[s] for s in (3, 4)}
    adapter = lambda out: load_file(out / "step_4" / "adapter" / "adapter_model.safetensors")
    assert _max_diff(adapter(tmp_path / "resumed" / "out"), adapter(dist)) == 0.0

    _assert_loads_in_transformers_and_peft(dist / "step_4", base)
    # `tune run quantize` converts the 2-rank folder into the model it trained as (measured 0.0, as on one device)
    got, want, unquantized = converted_fake_and_plain_logits(dist / "step_4", tmp_path / "q_dist")
    assert (got - want).abs().max().item() < 1e-5 and (got - unquantized).abs().max().item() > 1e-2
    # and near one device's converted model: steps 3-4 trained through different roundings (the unquantized
    # step_4 models' logits are 0.065 apart, the converted ones' 0.24, of logits up to 4.2 in magnitude)
    single_got, _, _ = converted_fake_and_plain_logits(tmp_path / "single" / "out" / "step_4", tmp_path / "q_single")
    assert (got - single_got).abs().max().item() < 0.5


def test_sigterm_saves_a_resumable_step_folder_on_every_rank(tmp_path, base, data):
    import signal
    import subprocess
    import time

    from torchft.checkpoint import resolve_resume_dir

    from ._launch import TUNE

    out = tmp_path / "out"
    # replicas=2 on 2 ranks: HSDP's 2-D mesh (replicated, one shard each), saved through DCP as well, in the
    # background (async_save): the stop waits for that save and puts its folder in place before it exits
    overrides = tiny_overrides(tmp_path, base, *data, ["max_steps=500", "save_every_n_steps=1000", "replicas=2",
                                                       "validation_dataset=null", "eval_every_n_steps=null",
                                                       "async_save=true"])
    args = [*TUNE, "run", "--standalone", "--nproc_per_node", "2", "lora_finetune_distributed", "--config",
            "quickstart/lora_distributed", *overrides]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # what SLURM sends on pre-emption
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.splitlines()[-1] == "tune: stopped by SIGTERM; the recipe processes exited after saving (see above)"
    saved = resolve_resume_dir("latest", out)
    step = int(saved.name.split("_")[1])
    assert 2 <= step < 500 and (saved / "distributed" / ".metadata").is_file()
    assert f"SIGTERM received: saved {saved}" in stderr
    assert not list(out.glob(".step_*"))  # nothing left under way


def test_hsdp_activation_checkpointing_and_tiled_mlp_train_as_the_plain_2_rank_run(lora_runs, base, data, tmp_path):
    """One launch, three settings the plain run lacks: replicas=2 (HSDP: 2 replicas x 1 shard), activation
    checkpointing under FSDP2, and the MLP in 16-token tiles. Each only changes where and when the same
    sums are computed: the losses are those of the plain 2-rank run (validation does not change training)."""
    _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed", tiny_overrides(
        tmp_path, base, *data, ["max_steps=6", "replicas=2", "enable_activation_checkpointing=true",
                                "tiled_mlp_tokens=16", "validation_dataset=null", "eval_every_n_steps=null"])))
    losses, plain = train_losses(tmp_path / "out"), train_losses(lora_runs["dist"])
    assert list(losses) == list(plain) == [1, 2, 3, 4, 5, 6]
    assert max(abs(losses[s] - plain[s]) for s in plain) < 1e-5, (losses, plain)
    adapter = lambda out: load_file(out / "step_6" / "adapter" / "adapter_model.safetensors")
    assert _max_diff(adapter(tmp_path / "out"), adapter(lora_runs["dist"])) < 1e-4


def test_compile_under_fsdp2_trains_as_eager(lora_runs, base, data, tmp_path):
    """compile=true on 2 ranks (inductor's CPU code, built with the system C compiler): the plain 2-rank
    run's losses within 1e-5 (inductor may fuse and reorder float sums). Compiling costs most of the launch."""
    _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed", tiny_overrides(
        tmp_path, base, *data, ["max_steps=6", "compile=true", "validation_dataset=null",
                                "eval_every_n_steps=null"]), timeout=400))
    losses, plain = train_losses(tmp_path / "out"), train_losses(lora_runs["dist"])
    assert list(losses) == [1, 2, 3, 4, 5, 6]
    assert max(abs(losses[s] - plain[s]) for s in plain) < 1e-5, (losses, plain)


@pytest.mark.gpu
def test_activation_checkpointing_and_offloading_under_fsdp2_on_2_gpus(tmp_path, data):
    """Offloading moves the checkpointed layer inputs to pinned host memory (CUDA only; a CPU run refuses
    it at setup). embed_dim 4096 makes each rank's layer input ([4, >= 30, 4096] fp32) at least the 1 MiB
    offloading moves; on 2 GPUs the losses are those of the same run without offloading."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    base = make_base(tmp_path, dict(num_layers=2, embed_dim=4096, num_heads=32, num_kv_heads=8,
                                    intermediate_dim=256, max_seq_len=256))
    losses = {}
    for name, offload in (("plain", "false"), ("offloaded", "true")):
        _run_ok(launch("lora_finetune_distributed", "quickstart/lora_distributed", tiny_overrides(
            tmp_path / name, base, *data, ["max_steps=2", "batch_size=8", "device=cuda", "enable_activation_checkpointing=true",
                                           f"enable_activation_offloading={offload}", "optimizer.lr=1e-4"])))
        losses[name] = train_losses(tmp_path / name / "out")
    assert list(losses["offloaded"]) == [1, 2]
    assert max(abs(losses["offloaded"][s] - losses["plain"][s]) for s in (1, 2)) < 1e-5, losses

