"""The verdict rules of benchmarks/bench_gguf_llamacpp.py on made-up logits (no llama.cpp needed): a greedy
divergence is accepted only at a near-tie, a logit difference only within the tolerance, ids only equal."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_gguf_llamacpp import NEW_TOKENS, compare, main, table  # noqa: E402

TOLERANCE = 2e-3  # f16's: with a largest logit of 10, a pair of logits may cross within 2 * 2e-3 * 10 = 0.04


def logits(second: float = 0.0):
    """[NEW_TOKENS, 4]: token 1 leads with 10 at every step; token 2 has ``second`` at step 5."""
    out = np.zeros((NEW_TOKENS, 4), dtype=np.float32)
    out[:, 1] = 10.0
    out[5, 2] = second
    return out


def row(ref, ours, ours_tokens, ids_equal=True):
    return compare("m", "f16", "p", ids_equal, [1] * NEW_TOKENS, ref, ours_tokens, ours, TOLERANCE)


def test_equal_tokens_and_close_logits_pass():
    r = row(logits(), logits() + 1e-3, [1] * NEW_TOKENS)
    assert not r.problems and r.same_tokens == NEW_TOKENS and r.margin is None
    assert r.max_diff == r.first_step_diff == pytest.approx(1e-4, rel=1e-3) and r.near_ties == 0


def test_a_divergence_passes_only_at_a_near_tie():
    tokens = [1] * 5 + [2] * (NEW_TOKENS - 5)
    ours = logits(10.02)  # llama.cpp's logits put token 2 first from step 5
    ours[6:, 2] = 11.0
    near = row(logits(9.99), ours, tokens)  # torchft's margin 0.01 <= 0.04: a tie rounding can flip
    assert near.same_tokens == 5 and near.explained and near.margin == pytest.approx(1e-3, rel=1e-3)
    assert near.near_ties == 1 and not [p for p in near.problems if "greedy" in p]
    far = row(logits(9.0), ours, tokens)  # margin 1.0: not a tie
    assert "greedy tokens differ at step 5 without a near-tie" in far.problems


def test_logits_beyond_the_tolerance_ids_and_a_non_greedy_sampler_fail():
    assert any("above 0.002" in p for p in row(logits(), logits() + 0.05, [1] * NEW_TOKENS).problems)
    assert "llama.cpp tokenizes the prompt differently" in row(logits(), logits(), [1] * NEW_TOKENS, False).problems
    assert "llama.cpp's sampler did not pick the arg-max" in row(logits(), logits(), [0] + [1] * 31).problems


def test_the_table_names_the_prompts_that_part():
    tokens = [1] * 5 + [2] * (NEW_TOKENS - 5)
    ours = logits(10.02)
    ours[6:, 2] = 11.0
    rows = [row(logits(), logits(), [1] * NEW_TOKENS), row(logits(9.99), ours, tokens)]
    line = table(rows).splitlines()[-1]
    assert line.startswith(f"| m | f16 | 2/2 | 1 x {NEW_TOKENS}/{NEW_TOKENS}; p: 5 (margin 1.0e-03) | 1 |")


def test_without_llama_cpp_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what a missing package looks like to import
    assert main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python' in err[0]
