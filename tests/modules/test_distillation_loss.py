"""The chunked distillation loss against a dense reference on full logits."""
import pytest
import torch
import torch.nn.functional as F

from torchft.modules.distillation import ChunkedDistillationLoss
from torchft.modules.loss import ChunkedCrossEntropy

VOCAB, DIM, TEACHER_DIM = 50, 8, 12


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, DIM, generator=g, requires_grad=True)  # 21 positions
    teacher_hidden = torch.randn(3, 7, TEACHER_DIM, generator=g)
    student_head = torch.nn.Linear(DIM, VOCAB, bias=False)
    teacher_head = torch.nn.Linear(TEACHER_DIM, VOCAB, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(VOCAB, DIM, generator=g))
        teacher_head.weight.copy_(torch.randn(VOCAB, TEACHER_DIM, generator=g))
    teacher_head.requires_grad_(False)
    targets = torch.randint(0, VOCAB, (3, 7), generator=g)
    targets[0, :4] = -100  # a prompt
    targets[2, 5:] = -100  # padding
    return hidden, teacher_hidden, student_head, teacher_head, targets


def _dense(hidden, teacher_hidden, student_head, teacher_head, targets, kd_ratio, temperature):
    logits = student_head(hidden).reshape(-1, VOCAB)  # [n, vocab]: the full logits
    t = targets.reshape(-1)
    keep = t != -100
    ce = F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
    s_logp = F.log_softmax(logits / temperature, -1)
    t_logp = F.log_softmax(teacher_head(teacher_hidden).reshape(-1, VOCAB) / temperature, -1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)  # KL(teacher || student) per token
    return (1 - kd_ratio) * ce + kd_ratio * kl[keep].sum(), keep.sum()


@pytest.mark.parametrize("chunk_tokens,kd_ratio,temperature", [(4, 0.5, 1.0), (5, 1.0, 2.0), (21, 0.3, 1.0)])
def test_chunked_kd_equals_dense_in_value_and_gradient(chunk_tokens, kd_ratio, temperature):
    hidden, teacher_hidden, student_head, teacher_head, targets = _setup()
    loss_fn = ChunkedDistillationLoss(kd_ratio=kd_ratio, temperature=temperature, chunk_tokens=chunk_tokens)
    loss, n = loss_fn(hidden, targets, student_head, list(student_head.parameters()), teacher_hidden, teacher_head)
    (loss / n).backward()
    grads = hidden.grad.clone(), student_head.weight.grad.clone()
    hidden.grad, student_head.weight.grad = None, None
    ref, ref_n = _dense(hidden, teacher_hidden, student_head, teacher_head, targets, kd_ratio, temperature)
    (ref / ref_n).backward()
    assert n == ref_n == 15
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], student_head.weight.grad)
    with torch.no_grad():  # the no-grad path (validation) gives the same value
        torch.testing.assert_close(loss_fn(hidden, targets, student_head, (), teacher_hidden, teacher_head)[0], ref)


def test_kd_ratio_zero_is_the_cross_entropy_exactly():
    hidden, teacher_hidden, student_head, teacher_head, targets = _setup(1)
    kd, _ = ChunkedDistillationLoss(kd_ratio=0.0, chunk_tokens=5)(
        hidden, targets, student_head, list(student_head.parameters()), teacher_hidden, teacher_head)
    kd.backward()
    grads = hidden.grad.clone(), student_head.weight.grad.clone()
    hidden.grad, student_head.weight.grad = None, None
    ce, _ = ChunkedCrossEntropy(chunk_tokens=5)(hidden, targets, student_head, list(student_head.parameters()))
    ce.backward()
    assert torch.equal(kd, ce)
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], student_head.weight.grad)


def test_kd_loss_arguments_are_checked():
    with pytest.raises(ValueError, match=r"loss kd_ratio \(1.5\) must be between 0 and 1"):
        ChunkedDistillationLoss(kd_ratio=1.5)
    with pytest.raises(ValueError, match=r"loss temperature \(0\) must be > 0"):
        ChunkedDistillationLoss(temperature=0)
