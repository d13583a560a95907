"""ChunkedCrossEntropy equals F.cross_entropy on full logits, in value and in gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchft.modules.loss import ChunkedCrossEntropy, shift_targets


def _setup(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    b, s, d, vocab = 2, 12, 16, 40
    hidden = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    weight = nn.Parameter(torch.randn(vocab, d, dtype=torch.float64) * 0.3)
    labels = torch.randint(0, vocab, (b, s))
    labels[0, :4] = -100  # a masked prompt
    labels[1, -3:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("num_chunks", [1, 3, 8])
def test_matches_full_logits_cross_entropy(num_chunks):
    hidden, weight, labels = _setup(tied=False)
    targets = shift_targets(labels)

    def output_fn(h):
        return F.linear(h, weight)

    ref = F.cross_entropy(output_fn(hidden).reshape(-1, weight.shape[0]), targets.reshape(-1), reduction="sum")
    ref_hidden_grad, ref_weight_grad = torch.autograd.grad(ref, [hidden, weight])

    loss_sum, num_tokens = ChunkedCrossEntropy(num_chunks=num_chunks)(hidden, targets, output_fn, [weight])
    assert num_tokens.item() == (targets != -100).sum().item()
    torch.testing.assert_close(loss_sum.double(), ref, rtol=1e-6, atol=1e-6)
    (loss_sum / num_tokens).backward()
    torch.testing.assert_close(hidden.grad.double(), ref_hidden_grad / num_tokens, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_weight_grad / num_tokens, rtol=1e-6, atol=1e-7)


def test_frozen_output_and_no_grad():
    hidden, weight, labels = _setup(tied=False, seed=1)
    weight.requires_grad_(False)
    targets = shift_targets(labels)
    loss_fn = ChunkedCrossEntropy(num_chunks=4)
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 40), targets.reshape(-1), reduction="sum")
    loss_sum, _ = loss_fn(hidden, targets, lambda h: h @ weight.T, [weight])
    loss_sum.backward()
    (ref_grad,) = torch.autograd.grad(ref, [hidden])
    torch.testing.assert_close(hidden.grad.double(), ref_grad, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        no_grad_sum, _ = loss_fn(hidden, targets, lambda h: h @ weight.T)
    torch.testing.assert_close(no_grad_sum.double(), ref.detach(), rtol=1e-6, atol=1e-6)


def test_all_targets_masked_gives_zero():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss_sum, n = ChunkedCrossEntropy()(hidden, torch.full((1, 4), -100), lambda h: h)
    assert n.item() == 0 and loss_sum.item() == 0.0


def test_shift_targets():
    labels = torch.tensor([[5, 6, 7, -100]])
    assert shift_targets(labels).tolist() == [[6, 7, -100, -100]]


def test_bad_num_chunks():
    with pytest.raises(ValueError, match=r"num_chunks \(0\) must be >= 1"):
        ChunkedCrossEntropy(num_chunks=0)
