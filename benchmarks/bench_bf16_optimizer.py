"""bf16 full fine-tuning: what AdamW on bf16 weights learns, costs in memory, and takes per step.

Four optimizers on the same model and data:

    fp32            fp32 weights, torch fused AdamW (the reference for what a run should learn)
    bf16 nearest    bf16 weights, torch fused AdamW (round to nearest: small updates are lost)
    bf16 master     bf16 weights, an fp32 master copy updated by torch AdamW and copied back
    bf16 SR         bf16 weights and moments, torchft's StochasticRoundingAdamW (the default)

Learning: a tiny Llama (dim 64, 2 layers) trained on a fixed random batch at lr 3e-5 for 60 steps;
"learned" = loss drop relative to the fp32 run's. Gradient-scale drop: 2048 weights, gradients with
E[g^2] = 1 for 1,000 steps then 0.01 for 1,000; the bias-corrected ``exp_avg_sq`` and the distance
moved after the drop, relative to fp32 torch AdamW. Cost: a larger Llama (dim 512, 8 layers, vocab
8192) with 4 x 256 tokens; optimizer + master bytes per parameter, the first step (with its
compilation), the median optimizer step over the next steps (forward/backward excluded), and the
step's extra peak RSS (the process's high-water mark reset before the step; CPU only).

    python benchmarks/bench_bf16_optimizer.py          # CPU, about 5 minutes; on CUDA when available
"""
import json
import statistics
import time
from pathlib import Path

import torch

from torchft.models import llama
from torchft.modules.loss import ChunkedCrossEntropy, output_params
from torchft.training.optim import build_adamw
from torchft.training.setup import default_dtype
from torchft.training.steps import forward_backward

TINY = dict(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            max_seq_len=256)
COST = dict(vocab_size=8192, num_layers=8, num_heads=8, num_kv_heads=4, embed_dim=512, intermediate_dim=1536,
            max_seq_len=512)


class MasterWeightsAdamW:
    """bf16 weights with an fp32 master copy: AdamW steps the masters, the weights get the rounded result."""

    def __init__(self, params, **kwargs):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float().requires_grad_() for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, fused=self.masters[0].is_cuda, **kwargs)

    @torch.no_grad()
    def step(self):
        for p, master in zip(self.params, self.masters):
            master.grad = p.grad.float()
        self.inner.step()
        for p, master in zip(self.params, self.masters):
            p.copy_(master)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return optimizer_state_bytes(self.inner) + sum(m.numel() * m.element_size() for m in self.masters)


def optimizer_state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


VARIANTS = {
    "fp32": (torch.float32, lambda params: build_adamw(params, lr=3e-5)),
    "bf16 nearest": (torch.bfloat16, lambda params: build_adamw(params, lr=3e-5, bf16_stochastic_round=False)),
    "bf16 master": (torch.bfloat16, lambda params: MasterWeightsAdamW(params, lr=3e-5)),
    "bf16 SR": (torch.bfloat16, lambda params: build_adamw(params, lr=3e-5)),
}


def make(dims: dict, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    with torch.device("cpu"), default_dtype(torch.float32):
        model = llama(**dims)  # identical fp32 init for every variant, then cast
    return model.to(device=device, dtype=dtype)


def batch(dims: dict, b: int, s: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, dims["vocab_size"], (b, s), generator=g)
    return {"tokens": tokens.to(device), "labels": tokens.clone().to(device)}


def learned(name: str, device: torch.device, steps: int = 60) -> float:
    dtype, build = VARIANTS[name]
    model = make(TINY, dtype, device)
    optimizer, loss_fn = build(model.parameters()), ChunkedCrossEntropy()
    data = batch(TINY, 8, 64, device)
    losses = []
    for _ in range(steps + 1):
        loss, _ = forward_backward(model, [data], loss_fn, output_params(model))
        losses.append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses[0] - losses[-1]


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux); return the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_bytes("VmRSS")


def cost(name: str, device: torch.device, warmup: int = 2, steps: int = 5) -> dict:
    dtype, build = VARIANTS[name]
    model = make(COST, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, loss_fn = build(params), ChunkedCrossEntropy()
    data = batch(COST, 4, 256, device)
    times, extra_rss = [], []
    for i in range(warmup + steps):
        forward_backward(model, [data], loss_fn, output_params(model))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rss = _reset_peak_rss() if device.type == "cpu" else 0
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if device.type == "cpu" and i >= warmup:  # after the first steps allocated the moments
            extra_rss.append(_rss_bytes("VmHWM") - rss)
        optimizer.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in params)
    state = optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else optimizer_state_bytes(optimizer)
    weights = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() for p in params)
    return dict(params_m=round(n / 1e6, 1), weight_bytes_per_param=weights / n,
                optimizer_bytes_per_param=round(state / n, 2), first_step_s=round(times[0], 1),
                optimizer_step_ms=round(1e3 * statistics.median(times[warmup:]), 1),
                extra_peak_rss_mib=round(max(extra_rss) / 2**20, 1) if extra_rss else None,
                largest_param_fp32_mib=round(4 * largest / 2**20, 1))


def gradient_scale_drop(name: str, n: int = 2048, steps: int = 1000) -> dict:
    """Bias-corrected exp_avg_sq and distance moved after a drop of E[g^2] from 1 to 0.01, vs fp32."""
    torch.manual_seed(0)
    init = torch.randn(n).to(torch.bfloat16)
    weight = torch.nn.Parameter(init.clone() if name.startswith("bf16") else init.float())
    ref = torch.nn.Parameter(init.float())
    if name == "bf16 master":
        opt = MasterWeightsAdamW([weight], lr=1e-3)
    else:  # fp32: fused AdamW; bf16: rounded to nearest or stochastically
        opt = build_adamw([weight], lr=1e-3, bf16_stochastic_round=name == "bf16 SR" if name != "fp32" else None)
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    for step in range(1, 2 * steps + 1):
        grad = (1.0 if step <= steps else 0.1) * (0.6 + 0.8 * torch.randn(n))  # [n]
        weight.grad, ref.grad = grad.to(weight.dtype), grad.clone()
        opt.step(), ref_opt.step()
        if step == steps:
            at_drop = weight.detach().float().clone(), ref.detach().clone()
    inner = opt.inner if isinstance(opt, MasterWeightsAdamW) else opt
    v = next(iter(inner.state.values()))["exp_avg_sq"].float().mean()
    moved = (at_drop[0] - weight.detach().float()).mean() / (at_drop[1] - ref.detach()).mean()
    return dict(v_vs_fp32=round(float(v / ref_opt.state[ref]["exp_avg_sq"].mean()), 3),
                moved_vs_fp32=round(float(moved), 3))


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    reference = learned("fp32", device)
    rows = []
    for name in VARIANTS:
        drop = reference if name == "fp32" else learned(name, device)
        row = dict(variant=name, device=str(device), loss_drop=round(drop, 4), learned=round(drop / reference, 3),
                   **gradient_scale_drop(name), **cost(name, device))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| optimizer | learned (vs fp32) | v / fp32 after the drop | moved / fp32 after the drop | "
          "weights B/param | optimizer B/param | first step | optimizer step | extra peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['learned']:.2f} | {r['v_vs_fp32']:.2f} | {r['moved_vs_fp32']:.2f} | "
              f"{r['weight_bytes_per_param']:.0f} | {r['optimizer_bytes_per_param']:.0f} | {r['first_step_s']} s | "
              f"{r['optimizer_step_ms']} ms | {r['extra_peak_rss_mib']} MiB |")


if __name__ == "__main__":
    main()
