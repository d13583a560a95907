"""The GPU session (benchmarks/gpu_session.sh) in its CPU dry run, and the suite's row runner: the budget
leaves out what cannot finish and stops what overruns, a failing row is reported and the next one runs,
each row's results are handed over as it ends, and no compiled graph outlives its row."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_finetune import Row, run_rows  # noqa: E402

# A stand-in for the shared peer harness: HF+PEFT measured, torchtune not installed, and for the full
# fine-tuning peers a line that is not JSON, so that their row fails and the suite must go on.
FAKE_HARNESS = """
import json, sys
for variant in [a for a in sys.argv[1:] if not a.startswith("--")]:
    if variant == "hf_peft_lora":
        print(json.dumps(dict(variant=variant, shape="tiny", bs=2, seq=64, tok_s=1000, step_s=0.128, peak_gib=0.5)))
    elif variant == "hf_full":
        print("{ not json")
    else:
        print(json.dumps(dict(variant=variant, error="ModuleNotFoundError: No module named 'torchtune'")))
"""


def _row(name, expected_s, run):
    return Row(name, "torchft", "compiled", expected_s, run)


def test_run_rows_keeps_to_the_budget_and_reports_each_row_as_it_ends():
    now = [0.0]  # a clock the rows move: what is left never depends on this machine's speed
    handed_over = []
    seen_at_start = {}

    def takes(name, seconds, error=None):
        def run(left):
            seen_at_start[name] = [r["workload"] for r in handed_over]
            now[0] += seconds
            if error:
                raise error
            return [dict(peer="torchft", workload=name, settings="compiled", tokens_per_s=1)]
        return run

    rows = [_row("a", 10, takes("a", 10)), _row("b", 10, takes("b", 5, RuntimeError("CUDA error: misaligned address"))),
            _row("c", 90, takes("c", 0)), _row("d", 20, takes("d", 20)), _row("e", 5, takes("e", 1))]
    results = run_rows(rows, budget_s=50, on_row=handed_over.extend, clock=lambda: now[0])
    assert [r["workload"] for r in results] == ["a", "b", "c", "d", "e"] and handed_over == results
    assert seen_at_start == {"a": [], "b": ["a"], "d": ["a", "b", "c"], "e": ["a", "b", "c", "d"]}  # c never started
    assert results[1]["skipped"] == "failed: RuntimeError: CUDA error: misaligned address"
    assert results[2]["skipped"] == "left out: expects 90 s, 35 s of the budget left"
    assert [r.get("tokens_per_s") for r in results] == [1, None, None, 1, 1]
    assert [r.get("seconds") for r in results] == [10, 5, None, 20, 1]


def test_a_row_running_past_the_budget_is_stopped():
    def sleeps(left):
        time.sleep(60)
        return []

    [stopped] = run_rows([_row("slow", 0, sleeps)], budget_s=0.3)
    assert stopped["skipped"].startswith("failed: TimeoutError: stopped at the end of the budget")


def test_only_torchtunes_rows_get_the_peers_packages(tmp_path, monkeypatch):
    """torchtune needs an older torchao than peft accepts: the HF rows run without the peers' path."""
    import bench_finetune

    harness = tmp_path / "bench_peers.py"
    harness.write_text("")
    monkeypatch.setattr(bench_finetune, "PEER_HARNESS", harness)
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen[cmd[-1]] = env.get("PYTHONPATH", "")
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="")

    monkeypatch.setattr(bench_finetune.subprocess, "run", fake_run)
    monkeypatch.setenv("PYTHONPATH", "/site")
    for variant in ("tt_lora_best", "hf_peft_lora"):
        bench_finetune.run_peers([variant], tiny=False, pythonpath="/peersite", timeout_s=10)
    assert seen == {"tt_lora_best": os.pathsep.join(["/peersite", "/site"]), "hf_peft_lora": "/site"}


def test_compiled_graphs_do_not_carry_over_between_rows():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter)
    def double(x):
        return x * 2

    def run(left):
        double(torch.ones(3))
        return [dict(peer="torchft", workload="w", settings="compiled", tokens_per_s=1, frames=counter.frame_count)]

    first, second = run_rows([_row("w", 0, run), _row("w", 0, run)], budget_s=60)
    assert (first["frames"], second["frames"]) == (1, 2)  # the second row compiled afresh


def test_gpu_session_dry_run_writes_every_row_into_the_folder_it_is_given(tmp_path):
    blocked = tmp_path / "blocked"  # lm-eval and wandb absent, as on the GPU machine
    for name in ("lm_eval", "wandb"):
        (blocked / name).mkdir(parents=True)
        missing = f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})'
        (blocked / name / "__init__.py").write_text(missing)
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "bench_peers.py").write_text(FAKE_HARNESS)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, PEER_HARNESS_DIR=str(harness),
               PYTHONPATH=os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "estimates.jsonl", "estimates.log", "gpu_tests.log",
                                                     "optimizer_step.log", "session.log", "suite.log",
                                                     "suite_rows.jsonl"]
    # the optimizer rows: torchft's bf16 AdamW and fused AdamW (bf16, fp32), full and LoRA shapes
    optimizer_rows = [json.loads(line) for line in (out / "optimizer_step.log").read_text().splitlines()[1:]]
    assert [(r["kind"], r["variant"]) for r in optimizer_rows] == [
        (kind, variant) for kind in ("full", "lora") for variant in ("torchft SR", "fused bf16", "fused fp32")]
    # every GPU test collected (none fails to import without lm-eval or wandb) and skipped on the CPU
    tests_summary = (out / "gpu_tests.log").read_text().strip().splitlines()[-1]
    assert re.search(r"\d+ skipped, \d+ deselected", tests_summary) and "error" not in tests_summary, tests_summary

    rows = [json.loads(line) for line in (out / "suite_rows.jsonl").read_text().splitlines()]
    found = {(r["workload"], r["peer"], r.get("settings", "")): r for r in rows}
    for settings in [("lora_1b", "eager"), ("qlora_8b", "eager + AC"), ("qlora_8b", "eager"), ("full_1b", "eager")]:
        row = found[(settings[0], "torchft", settings[1])]
        assert row["tokens_per_s"] > 0 and row["estimate_bytes"] > 0 and row["seconds"] >= 0, row
    assert found[("lora_1b", "hf_peft_lora", "")]["tokens_per_s"] == 1000
    assert found[("lora_1b", "tt_lora_best", "")]["skipped"] == "not installed here"
    assert found[("full_1b", "tt_full_best, hf_full", "")]["skipped"].startswith("failed: JSONDecodeError")
    decode = [r for r in rows if r["workload"] == "decode_tiny"]  # the row after the failure still ran
    assert len(decode) == 2 and all(r["tokens_per_s"] > 0 and r["same_tokens"] for r in decode)

    table = (out / "RESULTS.md").read_text()
    assert "the suite took" in table and "torch " in table and "commit " in table
    assert table.count("\n| ") == len(rows) + 1  # a line per result, below the header
    assert "suite exited 0" in (out / "session.log").read_text()
