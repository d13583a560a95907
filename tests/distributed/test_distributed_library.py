"""torchft.training.distributed and the launch checks: refusals before any work, per-rank memory,
a lost or hanging rank ending the job."""
import json
from pathlib import Path

import pytest
import torch

from torchft.cli import main as cli_main
from torchft.training.distributed import (NotLaunchedError, check_nf4_shardable, init_distributed, nf4_shard_counts,
                                          per_rank_batch_size)
from torchft.training.distributed_checkpoint import check_same_run, load_trainable_state, run_identity
from torchft.training.quickstart import tiny_base_model

from ._launch import TUNE

WORKER = Path(__file__).with_name("_worker.py")


# ------------------------------------------------------------------------------------------ refusals
def test_global_batch_must_divide_by_the_world_size():
    assert per_rank_batch_size(8, 2) == 4
    with pytest.raises(ValueError, match=r"batch_size \(6\) is the global batch and must be divisible by the world "
                                         r"size \(4\); nearest batch sizes that work: 4 or 8; world sizes that work: "
                                         r"1, 2, 3, 6$"):
        per_rank_batch_size(6, 4)
    with pytest.raises(ValueError, match=r"nearest batch sizes that work: 8; world sizes that work: 1, 3$"):
        per_rank_batch_size(3, 8)


def test_nf4_shard_rule_names_the_layer_its_shape_and_the_counts_that_work():
    from torchft.models import from_hf_config
    from torchft.models._llama import LlamaArgs

    args = LlamaArgs(vocab_size=1024, num_layers=1, num_heads=4, num_kv_heads=4, embed_dim=128,
                     intermediate_dim=256, max_seq_len=64)
    with torch.device("meta"):
        model = from_hf_config(args.to_hf_config(), lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8,
                               quantize_base=True)
    check_nf4_shardable(model, 1)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight \(128x128\) cannot be sharded as NF4 "
                                         r"over 2 ranks .*shard counts that work: 1$"):
        check_nf4_shardable(model, 2)
    assert nf4_shard_counts((4096, 4096)) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert nf4_shard_counts((256, 256)) == [1, 2, 4]
    assert nf4_shard_counts((100, 64)) == []


def test_a_distributed_recipe_without_torchrun_says_how_to_launch_it(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(NotLaunchedError, match=r"lora_finetune_distributed is a distributed recipe: launch it with "
                                               r"torchrun, e.g. `tune run --nproc_per_node <GPUs> lora_finetune_distributed"):
        init_distributed("cpu", recipe="lora_finetune_distributed")


def test_tune_run_refuses_more_processes_than_gpus_and_an_indivisible_batch(capsys):
    run = ["run", "--nproc_per_node", "2", "lora_finetune_distributed", "--config", "quickstart/lora_distributed"]
    for overrides, message in (
        (["device=cuda"], "tune: error: --nproc_per_node (2) needs 2 GPUs but none is visible: run on CPUs with "
                          "device=cpu (gloo)\n") if not torch.cuda.is_available() else
        (["device=cuda"], f"tune: error: --nproc_per_node ({torch.cuda.device_count() + 1})"),
        (["batch_size=3"], "tune: error: batch_size (3) is the global batch and must be divisible by the world size "
                           "(2); nearest batch sizes that work: 2 or 4; world sizes that work: 1, 3\n"),
    ):
        args = list(run)
        if torch.cuda.is_available() and overrides == ["device=cuda"]:
            args[2] = str(torch.cuda.device_count() + 1)
        with pytest.raises(SystemExit) as exit_info:
            cli_main.main([*args, *overrides])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.startswith(message)


def test_async_save_is_true_or_false_and_only_the_distributed_recipes_take_it(capsys, tmp_path):
    for config, override, problem in (
        ("quickstart/lora_distributed", "async_save=1", "async_save (1) must be true or false"),
        ("quickstart/full_dpo_distributed", "async_save=often", "async_save (often) must be true or false"),
        # single-device saves are written in line: the key is not theirs
        ("quickstart/lora_single_device", "+async_save=true", "async_save: unknown key for this recipe"),
    ):
        assert cli_main.main(["validate", "--config", config, override, f"output_dir={tmp_path}"]) == 1
        assert capsys.readouterr().err.splitlines()[1:] == [f"  {problem}"]
    assert cli_main.main(["validate", "--config", "quickstart/kd_distributed", "async_save=true",
                          f"output_dir={tmp_path}"]) == 0


def test_resume_refuses_a_folder_of_another_model_or_method(tmp_path):
    from torchft.models import from_hf_config
    from torchft.models._llama import LlamaArgs

    args = LlamaArgs(vocab_size=256, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                     max_seq_len=64)
    with torch.device("meta"):
        lora = from_hf_config(args.to_hf_config(), lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8)
        dora = from_hf_config(args.to_hf_config(), lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8,
                              use_dora=True)
        full = from_hf_config(args.to_hf_config())
    saved = run_identity("lora_finetune_distributed", lora)
    check_same_run(saved, run_identity("lora_finetune_distributed", lora), tmp_path)
    with pytest.raises(ValueError, match=r"was written by another adapter layout .*resume from a folder of this "
                                         r"run's config"):
        check_same_run(saved, run_identity("lora_finetune_distributed", dora), tmp_path)
    with pytest.raises(ValueError, match=r"was written by another recipe"):
        check_same_run(saved, run_identity("full_finetune_distributed", full), tmp_path)
    with pytest.raises(ValueError, match=r"not written by a distributed recipe"):
        check_same_run(None, saved, tmp_path)  # a single-device step folder
    with pytest.raises(FileNotFoundError, match=r"no distributed checkpoint here \(a step folder of a single-device"):
        load_trainable_state(lora, None, tmp_path / "distributed", adapters_only=True)


# ------------------------------------------------------------------------------------------ real ranks
def _worker(tmp_path: Path, **settings):
    import subprocess

    config = tmp_path / "worker.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in {"output_dir": tmp_path, "timeout_minutes": 1,
                                                          "die_rank": -1, "base": None, **settings}.items()))
    return subprocess.run([*TUNE, "run", "--standalone", "--nproc_per_node", "2", str(WORKER), "--config",
                           str(config)], capture_output=True, text=True, timeout=240)


def test_each_rank_holds_half_the_weights_and_loads_without_the_full_state_dict_then_a_lost_rank_ends_the_job(
        tmp_path):
    # ~60 MB of fp32 weights: large enough that holding them all would stand out of the allocator's noise
    base = tiny_base_model(str(tmp_path / "base"), num_layers=4, embed_dim=512, num_heads=8, num_kv_heads=4,
                           intermediate_dim=1536, vocab_size=1024)
    # rank 0's collectives would only time out after 30 minutes: what ends the job is rank 1's loss
    result = _worker(tmp_path, mode="load", base=base, die_rank=1, timeout_minutes=30)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert abs(rank["local_bytes"] - rank["full_bytes"] / 2) < 0.01 * rank["full_bytes"]
        # its shard, one full tensor in flight, and allocator slack; never the whole state dict
        assert rank["peak_load_growth"] < rank["full_bytes"] / 2 + rank["largest_tensor_bytes"] + 8 * 2**20, rank
    # rank 1 was killed in the middle of a save while rank 0 waited for it: the job ends, non-zero, naming it
    assert result.returncode == 1, result.stderr[-2000:]
    # a killed rank printed nothing: the line names the signal instead of pointing at an error above
    assert result.stderr.splitlines()[-1].endswith("recipe process(es) failed (rank 1: exit code -9, killed by "
                                                   "signal 9 (SIGKILL): likely out of host memory, no error was "
                                                   "printed)")
    # rank 0's collective failed because rank 1 was gone: it exits quietly, no gloo "connection reset" line
    assert "Connection reset by peer" not in result.stderr and "_worker.py: error" not in result.stderr
    # and the half-written folder is never a step folder: `resume_from_checkpoint=latest` cannot pick it
    from torchft.checkpoint import latest_step_dir

    assert (tmp_path / "out").is_dir()  # the save had started
    leftovers = [p.name for p in (tmp_path / "out").iterdir()]  # rank 0 removes its temporary folder if it can
    assert all(name.startswith(".step_1.tmp-") for name in leftovers), leftovers
    assert latest_step_dir(tmp_path / "out") is None


def test_a_background_save_is_renamed_into_place_only_once_written_and_a_sigkill_leaves_the_previous_step_latest(
        tmp_path):
    """async_save, with the background writes held on a gate (see _worker.background_saves): the folder stays
    temporary while held, the state written is that of its step though the next step changed the weights, and
    a job SIGKILLed while step 2 is held leaves step_1 as `latest`."""
    import os
    import signal
    import subprocess
    import time

    from tests.recipes._finetune import make_base
    from torchft.checkpoint import latest_step_dir, resolve_resume_dir

    base = make_base(tmp_path)
    out = tmp_path / "out"
    (out / ".step_0.tmp-abcd").mkdir(parents=True)  # what a killed run's save left: removed by the first save
    config = tmp_path / "worker.yaml"
    config.write_text(f"output_dir: {tmp_path}\nmode: async\nbase: {base}\ntimeout_minutes: 1\n")
    job = subprocess.Popen([*TUNE, "run", "--standalone", "--nproc_per_node", "2", str(WORKER), "--config",
                            str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = [tmp_path / f"pending_{rank}" for rank in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all(marker.exists() for marker in markers) and job.poll() is None:
            assert time.monotonic() < deadline, "the worker never reached its held save of step 2"
            time.sleep(0.2)
        for marker in markers:  # every rank, while step 2's shards are held in the background
            os.kill(int(marker.read_text()), signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)  # torchrun sees its ranks killed and ends the job
    finally:
        job.kill()  # (a no-op once it has ended)
    seen = json.loads((tmp_path / "async.json").read_text())
    assert seen["held_step_1_in_place"] is False  # written in the background: not renamed yet
    assert len(seen["held_folders"]) == 1 and seen["held_folders"][0].startswith(".step_1.tmp-"), seen
    assert seen["step_changed_the_state"] and seen["loaded_equals_step_1"], seen  # staged before the step
    assert seen["finished"] == str(out / "step_1")
    assert f"removed .step_0.tmp-abcd from {out}: the unfinished save of an interrupted run (never resumable)" \
        in stderr
    # killed while held: step 2 is only a temporary folder, holding all but its DCP shards' metadata
    (unfinished,) = [p for p in out.iterdir() if p.name.startswith(".step_2.tmp-")]
    assert (unfinished / "training_state.pt").is_file() and not (unfinished / "distributed" / ".metadata").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["step_1"]
    assert latest_step_dir(out) == resolve_resume_dir("latest", out) == out / "step_1"


def test_a_hanging_rank_ends_the_job_after_the_timeout(tmp_path):
    result = _worker(tmp_path, mode="hang", timeout_minutes=0.1)  # 6 s
    assert result.returncode == 1, result.stderr[-2000:]
    # rank 0's collective timed out (the process group aborts it); rank 1 was stopped because of it
    assert "recipe process(es) failed (rank 0: exit code" in result.stderr.splitlines()[-1]
    # and it was the configured 6 s timeout (gloo names it), not the 30 minutes of the default process group
    assert "Timed out waiting 6000ms" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("rank, error, said", [
    (0, "start", True), (1, "start", False),  # the same refusal on every rank: rank 0 says it
    (0, "lost peer", False), (1, "own", True),  # a rank's own error is said; a peer's loss is not
])
def test_in_a_job_each_error_is_said_once(monkeypatch, capsys, rank, error, said):
    from torchft.config._load import ConfigError
    from torchft.config._recipe import exit_with_error

    exc = {"start": ConfigError("batch_size (0) must be a positive integer"),
           "lost peer": RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"),
           "own": ValueError("dataset: data file not found: x.jsonl")}[error]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    with pytest.raises(SystemExit) as exit_info:
        exit_with_error(exc, "recipe.py", debug=False)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == (f"recipe.py: error: {exc}\n" if said else "")


def test_cpu_offload_is_refused_on_cpu_processes():
    from torchft.config import ConfigError
    from torchft.training.distributed import check_cpu_offload

    check_cpu_offload(False, torch.device("cpu"))
    check_cpu_offload(True, torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"cpu_offload=true keeps the GPU shards in host memory and needs "
                                          r"device=cuda; on device=cpu .*set cpu_offload=false$"):
        check_cpu_offload(True, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cpu_offload_and_fp32_reduce_train_on_2_gpus(tmp_path):
    from tests.recipes._finetune import make_base, make_data, train_losses

    from ._launch import launch, tiny_overrides

    base, data = make_base(tmp_path), make_data(tmp_path, val_rows=7)
    result = launch("full_finetune_distributed", "quickstart/full_distributed", tiny_overrides(
        tmp_path, base, *data, ["device=cuda", "dtype=bf16", "cpu_offload=true", "fp32_reduce=true"]))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(tmp_path / "out")
    assert list(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
