"""benchmarks/bench_gguf_llamacpp.py in its tiny mode (its default), where llama-cpp-python is installed (CI does
not build it): llama.cpp reads the exported GGUF files as torchft does (ids, greedy tokens, logits), and applies
the --adapter-only file on the base's GGUF as the merged GGUF."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gguf_llamacpp as bench  # noqa: E402

from torchft.checkpoint.gguf import LOGIT_TOLERANCE  # noqa: E402


def test_llamacpp_reads_the_exported_gguf_as_torchft_does(tmp_path, capsys, monkeypatch):
    rows, measure = [], bench.measure
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: rows.extend(measure(*args, **kwargs)) or rows)
    assert bench.main(["--workdir", str(tmp_path)]) == 0  # the documented command, in a temporary folder
    printed = capsys.readouterr().out
    assert "OK: every difference is within the stated tolerance" in printed
    n = bench.NEW_TOKENS
    # (random, quickstart) x (f16, bf16, q8_0) + the adapter on the base + 3 variants at f16; 7 prompts each
    assert len(rows) == (2 * 3 + 1 + len(bench.VARIANTS)) * 7
    assert {r.model for r in rows} == {"random", "quickstart", *bench.VARIANTS}
    for r in rows:
        assert r.ids_equal and r.sampler_is_argmax and not r.problems, r
        assert r.max_diff <= LOGIT_TOLERANCE[r.dtype.split()[0]], r
        if r.dtype.startswith("f16") and r.same_tokens < n:  # f16 parts only at a tie its own rounding flips
            assert r.margin <= 2 * r.max_diff, r
        if r.dtype == "f16 + lora":
            assert r.same_as_merged == n, r
    lora = next(line for line in printed.splitlines() if line.startswith("| quickstart | f16 + lora |"))
    assert lora.startswith(f"| quickstart | f16 + lora | 7/7 | 7 x {n}/{n} |") and lora.endswith(f"| 7 x {n}/{n} |")
