"""DPO / IPO / SimPO against TRL's trainers, and chunked log-probabilities against dense ones."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torchft.modules.preference import PreferenceLoss, sequence_log_probs

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")


def _logps(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = (-torch.rand(2 * b, generator=g, dtype=torch.float64) * 20).requires_grad_()
    reference = -torch.rand(2 * b, generator=g, dtype=torch.float64) * 20
    lengths = torch.tensor([3.0, 5.0, 7.0, 4.0, 6.0, 2.0], dtype=torch.float64)[:2 * b]
    return policy, reference, lengths


def _trl_dpo_loss(loss_type, beta, policy, reference, lengths):
    """TRL DPOTrainer._compute_loss on a model whose per-token log-probs sum to ``policy``."""
    seq = int(lengths.max()) + 1
    completion = torch.zeros(len(policy), seq, dtype=torch.long)
    per_token = torch.zeros(len(policy), seq - 1, dtype=policy.dtype)
    for row, n in enumerate(lengths.long().tolist()):
        completion[row, 1:1 + n] = 1
    per_token = per_token + (policy / 1.0)[:, None] * F.one_hot(torch.zeros(len(policy), dtype=torch.long), seq - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(len(policy), seq - 1),
                              mean_logits=torch.zeros(len(policy), seq - 1),
                              is_top1=torch.zeros(len(policy), seq - 1, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": __import__("collections").defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    chosen_ref, rejected_ref = reference.chunk(2)
    inputs = {"input_ids": torch.zeros(len(policy), seq, dtype=torch.long), "attention_mask": completion + 1,
              "completion_mask": completion, "ref_chosen_logps": chosen_ref, "ref_rejected_logps": rejected_ref}
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type,trl_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trl_dpo_trainer_loss_gradient_and_metrics(loss_type, trl_type):
    policy, reference, lengths = _logps()
    losses, chosen_r, rejected_r = PreferenceLoss(loss_type, beta=0.2)(policy, lengths, reference)
    grad, = torch.autograd.grad(losses.mean(), policy)
    theirs, metrics = _trl_dpo_loss(trl_type, 0.2, policy, reference, lengths)
    their_grad, = torch.autograd.grad(theirs, policy)
    torch.testing.assert_close(losses.mean(), theirs)
    torch.testing.assert_close(grad, their_grad)
    assert metrics["rewards/chosen"][0] == pytest.approx(float(chosen_r.mean()))
    assert metrics["rewards/accuracies"][0] == pytest.approx(float((chosen_r > rejected_r).float().mean()))
    assert metrics["rewards/margins"][0] == pytest.approx(float((chosen_r - rejected_r).mean()))


@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_label_smoothing_and_simpo_equal_trl_cpo_loss(loss_type):
    """TRL's CPO loss is conservative DPO on the log-ratios it is given, and SimPO on mean log-probs."""
    policy, reference, lengths = _logps()
    ours = PreferenceLoss(loss_type, beta=0.5, label_smoothing=0.1, simpo_gamma=0.3)
    losses, chosen_r, rejected_r = ours(policy, lengths, reference)
    trainer = SimpleNamespace(alpha=0.0, loss_type="sigmoid" if loss_type == "dpo" else "simpo", beta=0.5,
                              label_smoothing=0.1, simpo_gamma=0.3, accelerator=SimpleNamespace(device="cpu"))
    given = policy - reference if loss_type == "dpo" else policy / lengths
    theirs, their_chosen, their_rejected = trl_cpo.CPOTrainer.cpo_loss(trainer, *given.chunk(2))
    torch.testing.assert_close(losses, theirs)
    torch.testing.assert_close(torch.autograd.grad(losses.sum(), policy)[0],
                               torch.autograd.grad(theirs.sum(), policy)[0])
    torch.testing.assert_close(chosen_r, their_chosen.detach())


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"loss.loss_type \('kto'\) must be one of dpo, ipo, simpo"):
        PreferenceLoss("kto")
    with pytest.raises(ValueError, match=r"loss.label_smoothing \(0.5\) must be in \[0, 0.5\)"):
        PreferenceLoss(label_smoothing=0.5)


def test_chunked_log_probs_equal_the_dense_ones_and_their_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (4, 9), generator=g)
    targets[:, :3] = -100
    sums, counts = sequence_log_probs(hidden, targets, head, chunk_tokens=5)
    logp = torch.log_softmax(head(hidden), -1)  # [4, 9, 50]: the dense reference
    dense = (logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)).sum(1)
    torch.testing.assert_close(sums, dense)
    assert counts.tolist() == [6.0] * 4
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ours = torch.autograd.grad((sums * weights).sum(), [hidden, head.weight])
    ref = torch.autograd.grad((dense * weights).sum(), [hidden, head.weight])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
