"""AdamW builder, optimizer-in-backward, LR schedules and clipping."""
import copy
import math

import pytest
import torch
from torch import nn

from torchft.training.lr_schedule import build_lr_scheduler, load_lr_scheduler_state
from torchft.training.optim import OptimizerInBackward, build_adamw, clip_grad_norm


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, generator=g)
    return model(x).pow(2).mean()


def test_optimizer_in_backward_matches_adamw_with_schedule_and_resume():
    ref, fused = _model(), _model()
    ref_opt = build_adamw(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ref_sched = build_lr_scheduler(ref_opt, "cosine", num_warmup_steps=2, num_training_steps=6)
    oib = OptimizerInBackward(fused.parameters(), lr=1e-2, weight_decay=0.1)
    oib_sched = build_lr_scheduler(oib, "cosine", num_warmup_steps=2, num_training_steps=6)
    for step in range(6):
        _loss(ref, step).backward()
        ref_opt.step(), ref_opt.zero_grad(), ref_sched.step()
        _loss(fused, step).backward()  # the update happens here
        oib.step(), oib.zero_grad(), oib_sched.step()
        assert all(p.grad is None for p in fused.parameters())  # gradients freed by the hooks
        if step == 2:  # save, then continue from a fresh copy restored from the saved state
            state = (copy.deepcopy(fused.state_dict()), copy.deepcopy(oib.state_dict()), oib_sched.state_dict())
            oib.remove_hooks()
            fused = _model()
            fused.load_state_dict(state[0])
            oib = OptimizerInBackward(fused.parameters(), lr=1e-2, weight_decay=0.1)
            oib.load_state_dict(state[1])
            oib_sched = build_lr_scheduler(oib, "cosine", num_warmup_steps=2, num_training_steps=6)
            load_lr_scheduler_state(oib_sched, state[2])
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedules_shape_and_resume(name):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, name, num_warmup_steps=3, num_training_steps=13, min_lr_ratio=0.1)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warm-up reaches the peak at step 3
    end = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)), "linear": 0.1 + 0.9 * 0.1, "constant": 1.0}
    assert lrs[-1] == pytest.approx(end[name])
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_lr_scheduler(opt2, name, num_warmup_steps=3, num_training_steps=13, min_lr_ratio=0.1)
    load_lr_scheduler_state(sched2, sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_bad_schedule_and_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"lr_scheduler.name \(step\) must be one of cosine, linear, constant"):
        build_lr_scheduler(opt, "step")
    with pytest.raises(ValueError, match=r"optimizer.lr \(0\) must be > 0"):
        build_adamw(_model().parameters(), lr=0)
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw(frozen.parameters(), lr=1e-3)


def test_clip_grad_norm():
    model = _model()
    (_loss(model, 0) * 100).backward()
    before = clip_grad_norm(model.parameters(), max_norm=0.5)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 0.5 and after == pytest.approx(0.5, rel=1e-4)
    assert clip_grad_norm(model.parameters(), None) is None
