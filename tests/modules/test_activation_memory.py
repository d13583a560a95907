"""The memory-lean modules (RMSNorm, SwiGLU, tiled MLP) give the plain expressions' values and
gradients, and a decoder layer keeps no more for backward than the guarded figure."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models._hf_reference import hf_to_torchft_keys, tiny_hf_llama
from torchft.models import from_hf_config, llama
from torchft.modules.feed_forward import FeedForward
from torchft.modules.peft import get_adapter_params, set_trainable_params
from torchft.modules.rms_norm import RMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import activation_memory  # noqa: E402  (benchmarks/activation_memory.py: the accounting the table uses)


def _plain_rms_norm(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_plain_autograd(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(32).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 5, 32, dtype=dtype)
    out = norm(x)
    gx, gw = torch.autograd.grad(out, [x, norm.weight], grad)
    ref = _plain_rms_norm(x, norm.weight, norm.eps)
    rx, rw = torch.autograd.grad(ref, [x, norm.weight], grad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw, rw, **tol)


def _feed_forward(tile_tokens=None, seed=0):
    torch.manual_seed(seed)
    ff = FeedForward(nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16), tile_tokens=tile_tokens).double()
    return ff


@pytest.mark.parametrize("tile_tokens", [None, 4, 7, 100])
def test_feed_forward_matches_plain_swiglu(tile_tokens):
    """Recomputed product and sequence tiles: same values and gradients as the plain expression."""
    ff = _feed_forward(tile_tokens)
    x = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 13, 16, dtype=torch.float64)
    params = [x, *ff.parameters()]
    got = ff(x)
    got_grads = torch.autograd.grad(got, params, grad)
    ref = ff.down_proj(F.silu(ff.gate_proj(x)) * ff.up_proj(x))
    ref_grads = torch.autograd.grad(ref, params, grad)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_tiled_mlp_keeps_only_its_input():
    ff = _feed_forward(tile_tokens=4)
    x = torch.randn(1, 16, 16, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ff(x)
    assert [tuple(t.shape) for t in saved] == [(1, 16, 16)]


def test_model_gradients_match_transformers():
    """A whole tiny Llama in training mode: logits and every gradient as transformers computes them."""
    hf = tiny_hf_llama("llama3").train()
    ours = from_hf_config(hf.config.to_dict()).train()
    ours.load_state_dict(hf_to_torchft_keys(hf.state_dict()), strict=True)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    hf(tokens).logits.square().mean().backward()
    ours(tokens).square().mean().backward()
    hf_grads = {k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _tiny_figure(checkpointing: bool) -> float:
    return activation_memory.kib_per_token_per_layer("torchft", "tiny", tokens=64, checkpointing=checkpointing)


def test_saved_activation_bytes_per_layer_guard():
    """bf16 tiny layer (dim 64, MLP 128, 4/2 heads), LoRA r16 everywhere: what one layer keeps per token.

    Kept: the two norm inputs (2 x 128 B; their outputs are recomputed from them), q, k, v and the
    attention output (128 + 64 + 64 + 128 B), the gate and up projections (2 x 256 B), LoRA's rank-16
    intermediates (7 x 32 B) and small per-token statistics: about 1.4 KiB. The plain modules kept
    2.4 KiB (fp32 norm inputs, the norm outputs, silu(gate) and the product besides)."""
    figure = _tiny_figure(checkpointing=False)
    assert 1.0 < figure <= 1.45, figure


def test_checkpointed_layer_keeps_only_its_input():
    # one bf16 [dim] vector per token: 64 * 2 bytes
    assert _tiny_figure(checkpointing=True) == pytest.approx(128 / 1024)


def test_rope_and_norms_keep_no_fp32_activation():
    """Every [tokens, dim]-sized tensor a layer keeps is bf16 (RoPE's tables are shared by all layers)."""
    model, forward = activation_memory._torchft(1, activation_memory.LAYER_SHAPES["tiny"], False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.numel() >= 64 * 32:
            kept.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(torch.randint(0, 100, (1, 64)))
    assert kept and set(kept) == {torch.bfloat16}


def test_checkpointed_lora_model_gradients_equal_plain():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, forward = activation_memory._torchft(2, activation_memory.LAYER_SHAPES["tiny"], checkpointing)
        model.float()
        forward(torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
