"""Packed batches: flex_attention runs compiled (fused, no [s, s] scores) whatever the model's compile."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch._dynamo.exc import BackendCompilerFailed

from torchft.modules import attention
from torchft.modules.attention import GroupedQueryAttention
from torchft.modules.rope import RotaryEmbedding


def _attention_inputs(device="cpu", seq=128):
    torch.manual_seed(0)
    dim, heads, kv_heads, head_dim = 32, 4, 2, 16  # CUDA's flex kernel needs head_dim >= 16
    attn = GroupedQueryAttention(heads, kv_heads, head_dim, nn.Linear(dim, heads * head_dim),
                                 nn.Linear(dim, kv_heads * head_dim), nn.Linear(dim, kv_heads * head_dim),
                                 nn.Linear(heads * head_dim, dim)).to(device)
    x = torch.randn(1, seq, dim, device=device)
    cos, sin = RotaryEmbedding(head_dim)(torch.arange(seq, device=device)[None], torch.float32)
    documents = (torch.arange(seq, device=device) >= seq // 3).long()  # two packed documents
    dense = (documents[:, None] == documents[None, :]) & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()

    def same_document_causal(b, h, q_idx, kv_idx):
        return (documents[q_idx] == documents[kv_idx]) & (q_idx >= kv_idx)

    from torch.nn.attention.flex_attention import create_block_mask
    block_mask = create_block_mask(same_document_causal, 1, None, seq, seq, device=device)
    return attn, x, cos, sin, dense[None], block_mask


@pytest.fixture
def fresh_flex(monkeypatch):
    monkeypatch.setattr(attention, "_compiled_flex_attention", None)


def test_block_mask_goes_through_the_compiled_kernel(monkeypatch, fresh_flex):
    """An uncompiled model still calls flex_attention through torch.compile, compiled once."""
    attn, x, cos, sin, dense, block_mask = _attention_inputs()
    compiled, calls = [], []
    real_compile = torch.compile

    def fake_compile(fn, **kwargs):
        if fn is not attention.flex_attention:  # flex_attention's own eager path compiles helpers
            return real_compile(fn, **kwargs)
        compiled.append((fn, kwargs))

        def run(*args, **kw):
            calls.append(kw["block_mask"])
            return fn(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    with torch.no_grad():
        out = attn(x, cos, sin, mask=block_mask)
        attn(x, cos, sin, mask=block_mask)
        expected = attn(x, cos, sin, mask=dense)
    assert compiled == [(attention.flex_attention, {"dynamic": False})] and len(calls) == 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_falls_back_once_with_a_warning(monkeypatch, fresh_flex):
    attn, x, cos, sin, dense, block_mask = _attention_inputs()

    real_compile = torch.compile

    def failing_compile(fn, **kwargs):
        if fn is not attention.flex_attention:
            return real_compile(fn, **kwargs)

        def run(*args, **kw):
            raise BackendCompilerFailed(run, RuntimeError("no C++ compiler found"), None)
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"flex_attention could not be compiled on cpu .*no C\+\+ compiler"):
        out = attn(x, cos, sin, mask=block_mask)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention could not be compiled")
        attn(x, cos, sin, mask=block_mask)  # no second warning
        expected = attn(x, cos, sin, mask=dense)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("shape mismatch"),
                                   BackendCompilerFailed(None, torch.OutOfMemoryError("CUDA out of memory"), None)])
def test_errors_other_than_compile_failures_are_raised(monkeypatch, fresh_flex, error):
    """Out of memory (also inside a compiler error) or a real error: raised, and no fallback is kept."""
    attn, x, cos, sin, dense, block_mask = _attention_inputs()

    def run(*args, **kw):
        raise error

    monkeypatch.setattr(attention, "_compiled_flex_attention", run)
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(type(error)):
        warnings.filterwarnings("error", message="flex_attention could not be compiled")
        attn(x, cos, sin, mask=block_mask)
    assert attention._compiled_flex_attention is run


@pytest.mark.gpu
def test_compiled_flex_matches_dense_mask_with_gradients(fresh_flex):
    attn, x, cos, sin, dense, block_mask = _attention_inputs("cuda", seq=256)
    x.requires_grad_(True)
    with warnings.catch_warnings():  # the fused kernel itself, not the unfused fallback
        warnings.filterwarnings("error", message="flex_attention could not be compiled")
        out = attn(x, cos, sin, mask=block_mask)
    (grad,) = torch.autograd.grad(out.square().sum(), [x])
    expected = attn(x, cos, sin, mask=dense)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), [x])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)
