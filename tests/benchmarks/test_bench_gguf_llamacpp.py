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
    assert len(rows) == 2 * 3 * 7 + 7  # (random, quickstart) x (f16, bf16, q8_0) x 7 prompts + the adapter's 7
    for r in rows:
        assert r.ids_equal and r.sampler_is_argmax and not r.problems, r
        assert r.max_diff <= LOGIT_TOLERANCE[r.dtype.split()[0]], r
        if r.dtype.startswith("f16"):  # f16: every greedy token equal on these models
            assert r.same_tokens == n, r
        if r.dtype == "f16 + lora":
            assert r.same_as_merged == n, r
    assert f"| quickstart | f16 + lora | chat (llama.cpp built-in) | yes | {n}/{n} |" in printed
