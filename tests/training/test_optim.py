"""AdamW builder, optimizer-in-backward, LR schedules and clipping."""
import copy
import math
import os

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
    # without clipping: the norm only (the non-finite check needs it), gradients untouched
    assert clip_grad_norm(model.parameters(), None) == pytest.approx(0.5, rel=1e-4)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])) == after


def test_bf16_weights_keep_updates_below_half_an_ulp():
    # 1.0 in bf16 has an ulp of 2**-7: an AdamW step of lr=1e-3 is 1/8 of it, which rounding to
    # nearest throws away every time; stochastic rounding keeps it on average.
    torch.manual_seed(0)
    weights = {}
    for stochastic in (False, True):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = build_adamw([p], lr=1e-3, bf16_stochastic_round=None if stochastic else False)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            opt.step()
        weights[stochastic] = p.detach().float()
        assert p.dtype is torch.bfloat16
    assert torch.equal(weights[False], torch.ones(4096))  # every update lost
    assert weights[True].mean().item() == pytest.approx(1 - 20 * 1e-3, abs=2e-3)  # 20 updates of lr each


def test_bf16_adamw_under_optimizer_in_backward_with_a_schedule():
    torch.manual_seed(0)
    model = _model().to(torch.bfloat16)
    oib = OptimizerInBackward(model.parameters(), lr=1e-2)
    sched = build_lr_scheduler(oib, "linear", num_warmup_steps=0, num_training_steps=4)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()  # each weight is updated here, by its own AdamW
        oib.step(), sched.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert oib.param_groups[0]["lr"] == pytest.approx(1e-2 * 1 / 4)  # the schedule drives every weight's AdamW
    assert all(p.dtype is torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp32_in_backward", "bf16_in_backward"])
def test_a_non_finite_gradient_skips_the_update_on_the_device(kind):
    from torchft.training.optim import nonfinite_flag, step_unless_nonfinite

    dtype = torch.bfloat16 if kind.startswith("bf16") else torch.float32
    model = _model().to(dtype)
    in_backward = kind.endswith("in_backward")
    opt = OptimizerInBackward(model.parameters(), lr=1e-2) if in_backward else build_adamw(model.parameters(), lr=1e-2)

    def step(poison: bool):
        handle = model[0].weight.register_hook(lambda g: g * float("inf")) if poison else None
        loss = model(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)).float().pow(2).mean()
        loss.backward()  # a finite loss; with poison, one weight's gradient is inf
        if handle is not None:
            handle.remove()
        if in_backward:
            return opt.step_stats(loss)[1]
        found_inf = nonfinite_flag(loss, clip_grad_norm(model.parameters(), None))
        step_unless_nonfinite(opt, found_inf)
        opt.zero_grad()
        return found_inf

    assert step(poison=False).item() == 0.0
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    assert step(poison=True).item() == 1.0
    if not in_backward:  # one AdamW for all: nothing moved; in backward, only the poisoned weight stays
        for key, value in model.state_dict().items():
            assert torch.equal(value, weights[key]), key
        assert repr(opt.state_dict()) == repr(state)  # moments and step counts untouched
    assert torch.equal(model[0].weight, weights["0.weight"]) and torch.isfinite(model[0].weight).all()
    assert step(poison=False).item() == 0.0 and not torch.equal(model[0].weight, weights["0.weight"])


@pytest.mark.parametrize("noise", ["hash", "generator"])
def test_bf16_adamw_follows_fp32_when_the_gradient_scale_drops(noise, monkeypatch):
    # E[g^2] = 1 for 1000 steps, then 0.01. Rounded to nearest, bf16 exp_avg_sq could not decay by
    # 0.1% a step: 500 steps after the drop it was 1.7x fp32's, and the weights moved half as far.
    # "generator": the noise GPUs draw from their random generator, here from the CPU's.
    from torchft.training import optim

    monkeypatch.setattr(optim, "_noise_from_generator", lambda p: noise == "generator")
    torch.manual_seed(0)
    init = torch.randn(2048).to(torch.bfloat16)
    bf16 = nn.Parameter(init.clone())
    fp32 = nn.Parameter(init.float())
    opts = [build_adamw([bf16], lr=1e-3), torch.optim.AdamW([fp32], lr=1e-3, weight_decay=0.0)]
    for step in range(1, 1501):
        scale = 1.0 if step <= 1000 else 0.1
        grad = scale * (0.6 + 0.8 * torch.randn(2048))  # [2048], a steady direction under noise
        bf16.grad, fp32.grad = grad.to(torch.bfloat16), grad.clone()
        for opt in opts:
            opt.step()
        if step == 1000:
            at_drop = (bf16.detach().float().clone(), fp32.detach().clone())
    correction = 1 - 0.999**1500
    v_bf16, v_fp32 = (opt.state[p]["exp_avg_sq"].float().mean() / correction for opt, p in zip(opts, (bf16, fp32)))
    assert opts[0].state[bf16]["exp_avg_sq"].dtype is torch.bfloat16
    assert v_bf16 / v_fp32 == pytest.approx(1.0, abs=0.03)
    moved_bf16 = (at_drop[0] - bf16.detach().float()).mean()  # along the gradients' mean direction
    moved_fp32 = (at_drop[1] - fp32.detach()).mean()
    assert moved_bf16 / moved_fp32 == pytest.approx(1.0, abs=0.05)


def test_one_compiled_update_serves_every_weight_shape(monkeypatch):
    from torch._dynamo.utils import counters

    from torchft.training import _cpu_adamw

    monkeypatch.setattr(_cpu_adamw, "available", lambda: False)  # the compiled update (GPUs; CPUs without cc)

    torch._dynamo.reset()  # count from an empty cache
    compiled_before = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 48), nn.LayerNorm(48), nn.Linear(48, 8))
    model.to(torch.bfloat16)  # 6 weights, 5 shapes
    for opt in (build_adamw(model.parameters(), lr=1e-3, weight_decay=0.1),
                OptimizerInBackward(model.parameters(), lr=1e-3, weight_decay=0.1)):
        for _ in range(2):
            model(torch.arange(8)).float().pow(2).mean().backward()
            opt.step(), opt.zero_grad()
        if isinstance(opt, OptimizerInBackward):
            opt.remove_hooks()
    assert counters["stats"]["unique_graphs"] - compiled_before == 1  # one for all shapes, not one per shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_decay_skips_1d_parameters_and_dora_magnitudes_unless_asked(dtype):
    from torchft.modules.peft.dora import DoRALinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), DoRALinear(16, 4, rank=2, alpha=4))
    model.to(dtype)
    for decay_all in (False, True):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = build_adamw(model.parameters(), lr=0.1, weight_decay=0.5, decay_all_params=decay_all)
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None  # AdamW then only decays: w * (1 - lr * wd)
        opt.step()
        for name, p in model.named_parameters():
            if name not in before:  # DoRA's frozen base weight
                continue
            decayed = decay_all or p.ndim >= 2
            expected = before[name] * (0.95 if decayed else 1.0)
            torch.testing.assert_close(p.detach().float(), expected.float(), atol=0, rtol=1e-2, msg=name)
    assert {"1.weight", "1.bias", "2.magnitude", "0.bias"} <= {n for n, p in model.named_parameters() if p.ndim == 1}


def test_stochastic_rounding_needs_bf16_weights():
    with pytest.raises(ValueError, match=r"optimizer.bf16_stochastic_round=true needs bf16 weights; a trainable "
                                         r"parameter of shape \[16, 8\] is torch.float32"):
        build_adamw(_model().parameters(), lr=1e-3, bf16_stochastic_round=True)


@pytest.mark.parametrize("in_backward", [False, True])
def test_bf16_adamw_resumes_exactly(in_backward):
    # The rounding noise is a function of the step count (saved), not of a generator's state.
    def build(model):
        params = model.parameters()
        return OptimizerInBackward(params, lr=1e-2) if in_backward else build_adamw(params, lr=1e-2)

    def train(model, opt, steps):
        for step in steps:
            model(torch.randn(5, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)).float().pow(
                2).mean().backward()
            opt.step(), opt.zero_grad()

    model = _model().to(torch.bfloat16)
    opt = build(model)
    train(model, opt, range(3))
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, range(3, 6))
    if in_backward:
        opt.remove_hooks()
    resumed = _model().to(torch.bfloat16)
    resumed.load_state_dict(saved[0])
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(saved[1])
    train(resumed, resumed_opt, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_tune_estimate_counts_four_bytes_of_bf16_adamw_state_per_parameter():
    from torchft.models import llama
    from torchft.modules.loss import ChunkedCrossEntropy
    from torchft.training.estimate import estimate_step
    from torchft.training.setup import default_dtype

    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = llama(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                      max_seq_len=64)
    estimate = estimate_step(model, batch_size=1, seq_len=16, loss_fn=ChunkedCrossEntropy(),
                             make_optimizer=lambda params: build_adamw(params, lr=1e-3))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    # two bf16 moments per parameter; each state tensor (the step's too) is rounded up to a 512-byte block
    assert 4 * n <= estimate.breakdown["optimizer_states"] <= 4 * n + 3 * 512 * len(params)


def test_rounding_noise_is_the_same_in_32_and_64_bit_integers_and_unbiased():
    """A GPU compile may widen the element index to 64 bits: the hashed noise must not change with it,
    and each of its three 16-bit windows must be uniform over [0, 2**16) (a window reaching past the
    hash's 31 bits would be biased toward rounding down)."""
    from torchft.training.optim import _hash31, _noise_window

    x = torch.arange(1 << 20, dtype=torch.int32) * 0x27D4EB2F + -1640531527 * 3 + 12345  # wraps in int32
    wide = torch.arange(1 << 20, dtype=torch.int64) * 0x27D4EB2F + (-1640531527 * 3 + 12345)  # does not
    bits = _hash31(x)
    assert torch.equal(bits.long(), _hash31(wide))
    for i in range(3):
        noise = _noise_window(bits, i).double()
        assert noise.min() >= 0 and noise.max() < 2**16
        assert abs(noise.mean().item() / (2**16 - 1) - 0.5) < 2e-3  # uniform: mean (2**16 - 1) / 2
        assert abs(noise.std().item() / 2**16 - 12 ** -0.5) < 2e-3


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_cpu_loop_updates_bit_for_bit_as_the_eager_update(weight_decay, monkeypatch):
    """The C loop that runs the bf16 AdamW on the CPU (split over threads for a large weight) gives
    the eager update's weights, moments and step count exactly, gradient scale changes included."""
    from torchft.training import _cpu_adamw, optim

    import shutil

    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on the PATH: the CPU uses the compiled update")
    assert _cpu_adamw.available()  # with a C compiler the loop must build
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three chunks of a tensor past _CHUNK
    torch.manual_seed(0)
    n = _cpu_adamw._CHUNK + 1001
    state = [torch.randn(n).to(torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16),
             torch.zeros(n, dtype=torch.bfloat16)]  # weight, exp_avg, exp_avg_sq
    eager = [t.clone() for t in state]
    steps, eager_steps, lr = torch.zeros(()), torch.zeros(()), torch.tensor(1e-3)
    for k in range(4):
        grad = (torch.randn(n) * 10.0**-k).to(torch.bfloat16)
        found_inf = torch.tensor(float(k == 2))  # the third step is skipped
        _cpu_adamw.sr_adamw_update(*state[:1], grad, *state[1:], steps, lr, found_inf, 7, 0.9, 0.999, 1e-8,
                                   weight_decay)
        optim._adamw_update(*eager[:1], grad, *eager[1:], eager_steps, lr, found_inf, 7, 0.9, 0.999, 1e-8,
                            weight_decay)
        for name, got, want in zip(("weight", "exp_avg", "exp_avg_sq"), state, eager):
            assert torch.equal(got, want), (k, name, (got != want).sum().item())
    assert steps.item() == eager_steps.item() == 3.0
