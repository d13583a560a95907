"""Generation: greedy parity with transformers, sampling controls, batching and input checks."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "assets"))
from tiny_llama_pair import make_pair  # noqa: E402

from torchft.generation import generate, generate_with_stats, sample_next_token  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    return make_pair(seed=0)


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
    )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prompt", [[1, 5, 9, 22, 40], [1, 17]])
def test_greedy_matches_transformers(pair, prompt):
    hf_model, model = pair
    expected = _hf_greedy(hf_model, prompt, 20)
    assert generate(model, prompt, max_new_tokens=20) == expected


def test_tied_embeddings_greedy_matches_transformers():
    hf_model, model = make_pair(seed=3, tie_word_embeddings=True)
    prompt = [1, 30, 31, 32]
    assert generate(model, prompt, max_new_tokens=12) == _hf_greedy(hf_model, prompt, 12)


def test_left_padded_batch_equals_one_by_one(pair):
    _, model = pair
    prompts = [[1, 5, 9, 22, 40, 41, 42], [1, 17], [1, 8, 8, 8]]
    batched = generate(model, prompts, max_new_tokens=10)
    for prompt, row in zip(prompts, batched):
        assert row == generate(model, prompt, max_new_tokens=10)


def test_stop_token_ends_row_and_is_kept(pair):
    _, model = pair
    free = generate(model, [1, 5, 9], max_new_tokens=15)
    stop = free[4]
    first = free.index(stop)
    assert generate(model, [1, 5, 9], max_new_tokens=15, stop_tokens=[stop]) == free[: first + 1]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(pair):
    _, model = pair
    a = generate(model, [1, 5, 9], max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    b = generate(model, [1, 5, 9], max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert a == b
    assert a != generate(model, [1, 5, 9], max_new_tokens=20)


def test_top_k_one_is_greedy_and_top_p_keeps_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next_token(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0]
    # probs row 0 ~ [.02, .49, .07, .43]: top_p=0.5 keeps tokens 1 and 3 only.
    picks = {int(sample_next_token(logits[:1], 1.0, top_p=0.5, generator=g)) for _ in range(100)}
    assert picks == {1, 3}


def test_stats_report_speed_and_memory(pair):
    _, model = pair
    out = generate_with_stats(model, [1, 5, 9], max_new_tokens=8)
    assert out.new_tokens == 8 and len(out.tokens[0]) == 8
    assert out.tokens_per_second > 0 and out.peak_memory_gib > 0
    assert not model.caches_are_enabled()  # caches are freed after generation


def test_compiled_decode_matches_eager(pair):
    _, model = pair
    eager = generate(model, [1, 5, 9, 22], max_new_tokens=6)
    assert generate(model, [1, 5, 9, 22], max_new_tokens=6, compile=True) == eager


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a device value back to the host (a sync on CUDA)."""

    SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNC_OPS
        return func(*args, **(kwargs or {}))


def test_decode_step_with_kv_cache_never_syncs(pair):
    _, model = pair
    model.setup_caches(1, torch.float32, max_seq_len=16)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9]]))  # prefill
            for step in range(3):
                with _SyncCounter() as counter:
                    model(torch.tensor([[7]]), input_pos=torch.tensor([[3 + step]]))
                assert counter.count == 0
        # The host-side bound still holds: two more tokens than the cache has room for are refused.
        with pytest.raises(ValueError, match="KV cache holds 16 positions; 6 are filled and 11 more do not fit"):
            model(torch.ones(1, 11, dtype=torch.long))
    finally:
        model.clear_caches()


def test_prefill_computes_the_last_positions_logits_only(pair):
    _, model = pair
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1]))
    try:
        generate(model, [1, 5, 9, 22, 40], max_new_tokens=3)
    finally:
        handle.remove()
    assert rows == [torch.Size([1])] + [torch.Size([1, 1])] * 2  # prefill [b], then two decode steps [b, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_tokens=[], max_new_tokens=5), "prompt is empty"),
        (dict(prompt_tokens=[1, 2], max_new_tokens=0), r"max_new_tokens \(0\) must be > 0"),
        (dict(prompt_tokens=[1, 2], max_new_tokens=-3), r"max_new_tokens \(-3\) must be > 0"),
        (dict(prompt_tokens=[1, 2], max_new_tokens=5, temperature=-1.0), r"temperature \(-1.0\) must be >= 0"),
        (dict(prompt_tokens=[1, 2], max_new_tokens=5, top_p=1.5), r"top_p \(1.5\) must be in \(0, 1\]"),
        (dict(prompt_tokens=[1, 2], max_new_tokens=5, top_k=0), r"top_k \(0\) must be >= 1"),
        (dict(prompt_tokens=[1, 2], max_new_tokens=1000), r"exceeds the model's max_seq_len \(256\)"),
    ],
)
def test_bad_input_has_clear_message(pair, kwargs, match):
    _, model = pair
    with pytest.raises(ValueError, match=match):
        generate(model, **kwargs)
