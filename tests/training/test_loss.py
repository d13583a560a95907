"""ChunkedCrossEntropy equals F.cross_entropy on full logits, in value and in gradients, without
a host-device synchronisation and with memory bounded by the chunk size."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("chunking", [dict(num_chunks=1), dict(num_chunks=3), dict(chunk_tokens=5),
                                      dict(chunk_tokens=1000)])
def test_matches_full_logits_cross_entropy(chunking):
    hidden, weight, labels = _setup(tied=False)
    targets = shift_targets(labels)

    def output_fn(h):
        return F.linear(h, weight)

    ref = F.cross_entropy(output_fn(hidden).reshape(-1, weight.shape[0]), targets.reshape(-1), reduction="sum")
    ref_hidden_grad, ref_weight_grad = torch.autograd.grad(ref, [hidden, weight])

    loss_sum, num_tokens = ChunkedCrossEntropy(**chunking)(hidden, targets, output_fn, [weight])
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


def test_bad_chunking():
    with pytest.raises(ValueError, match=r"num_chunks \(0\) must be >= 1"):
        ChunkedCrossEntropy(num_chunks=0)
    with pytest.raises(ValueError, match=r"chunk_tokens \(0\) must be >= 1"):
        ChunkedCrossEntropy(chunk_tokens=0)


class SyncOpCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value back, nonzero, and
    boolean-mask indexing (whose output shape depends on the data)."""

    SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        indices = args[1] if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                                      torch.ops.aten.index_put.default) else ()
        boolean_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if func in self.SYNC_OPS or boolean_index or func.__name__.startswith("item"):
            self.seen.append(str(func))
        return func(*args, **kwargs)


def test_counter_sees_syncs():
    """The counter itself: a boolean gather and an .item() are caught."""
    x = torch.randn(6)
    with SyncOpCounter() as counter:
        x[x > 0].sum().item()
    assert len(counter.seen) >= 2


@pytest.mark.parametrize("trainable_output", [True, False])
def test_forward_backward_has_no_sync(trainable_output):
    hidden, weight, labels = _setup(tied=False, seed=2)
    weight.requires_grad_(trainable_output)
    targets = shift_targets(labels)
    loss_fn = ChunkedCrossEntropy(chunk_tokens=5)
    with SyncOpCounter() as counter:
        loss_sum, num_tokens = loss_fn(hidden, targets, lambda h: F.linear(h, weight), [weight])
        (loss_sum / num_tokens).backward()
        with torch.no_grad():
            loss_fn(hidden, targets, lambda h: F.linear(h, weight))
    assert counter.seen == []


def test_logits_memory_is_bounded_by_chunk_tokens():
    """The largest logits-shaped tensor the loss creates is one chunk, whatever the sequence length."""

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == vocab:  # logits-like
                    self.largest = max(self.largest, t.numel())
            return out

    vocab, dim, chunk = 50, 8, 16
    weight = nn.Parameter(torch.randn(vocab, dim))
    largest = []
    for seq in (64, 512):
        hidden = torch.randn(1, seq, dim, requires_grad=True)
        targets = torch.randint(0, vocab, (1, seq))
        with LargestAllocation() as tracker:
            loss_sum, _ = ChunkedCrossEntropy(chunk_tokens=chunk)(hidden, targets, lambda h: F.linear(h, weight),
                                                                   [weight])
            loss_sum.backward()
        largest.append(tracker.largest)
    assert largest[0] == largest[1] == chunk * vocab


@pytest.mark.parametrize("chunking", [dict(chunk_tokens=8), dict(num_chunks=3)])
def test_compiled_loss_compiles_at_most_twice_over_batch_lengths(monkeypatch, chunking):
    """Every padded batch length gives another last-chunk (or chunk) size: one graph serves them all."""
    from torch._dynamo.testing import CompileCounter

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counter, **kwargs))
    torch._dynamo.reset()
    loss_fn, eager_fn = ChunkedCrossEntropy(compile=True, **chunking), ChunkedCrossEntropy(**chunking)
    weight = nn.Parameter(torch.randn(40, 16) * 0.3)
    for seq_len in (11, 13, 14, 20, 17):
        hidden = torch.randn(1, seq_len, 16, requires_grad=True)
        targets = torch.randint(0, 40, (1, seq_len))
        got, _ = loss_fn(hidden, targets, lambda h: F.linear(h, weight), [weight])
        want, _ = eager_fn(hidden, targets, lambda h: F.linear(h, weight), [weight])
        torch.testing.assert_close(got, want)
    assert 1 <= counter.frame_count <= 2
    torch._dynamo.reset()
