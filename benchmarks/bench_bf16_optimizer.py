"""bf16 full fine-tuning: what AdamW on bf16 weights learns, costs in memory, and takes per step.

Four optimizers on the same model and data:

    fp32            fp32 weights, torch AdamW (the reference for what a run should learn)
    bf16 nearest    bf16 weights, torch AdamW (round to nearest: small updates are lost)
    bf16 master     bf16 weights, an fp32 master copy updated by torch AdamW and copied back
    bf16 SR         bf16 weights, torchao AdamW with bf16 stochastic rounding (torchft's default)

Learning: a tiny Llama (dim 64, 2 layers) trained on a fixed random batch at lr 3e-5 for 60 steps;
"learned" = loss drop relative to the fp32 run's. Cost: a larger Llama (dim 512, 8 layers, vocab 8192)
with 4 x 256 tokens; optimizer + master bytes per parameter and the median optimizer step time
(forward/backward excluded) over 10 steps after 3 warm-up steps.

    python benchmarks/bench_bf16_optimizer.py          # CPU, about 5 minutes; on CUDA when available
"""
import json
import statistics
import time

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
    "bf16 SR, compiled step": (torch.bfloat16, lambda params: _torchao_adamw()(params, lr=3e-5, weight_decay=0.0,
                                                                              bf16_stochastic_round=True)),
}


def _torchao_adamw():
    """torchao's AdamW itself, whose step is compiled per parameter shape also on the CPU."""
    import torchao.optim

    return getattr(torchao.optim, "AdamW", None) or torchao.optim._AdamW


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


def cost(name: str, device: torch.device, warmup: int = 3, steps: int = 10) -> dict:
    dtype, build = VARIANTS[name]
    model = make(COST, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, loss_fn = build(params), ChunkedCrossEntropy()
    data = batch(COST, 4, 256, device)
    times = []
    for i in range(warmup + steps):
        forward_backward(model, [data], loss_fn, output_params(model))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in params)
    state = optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else optimizer_state_bytes(optimizer)
    weights = sum(p.numel() * p.element_size() for p in params)
    return dict(params_m=round(n / 1e6, 1), weight_bytes_per_param=weights / n,
                optimizer_bytes_per_param=round(state / n, 2), optimizer_step_ms=round(1e3 * statistics.median(times), 1))


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    reference = learned("fp32", device)
    rows = []
    for name in VARIANTS:
        drop = reference if name == "fp32" else learned(name, device)
        row = dict(variant=name, device=str(device), loss_drop=round(drop, 4), learned=round(drop / reference, 3),
                   **cost(name, device))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| optimizer | learned (vs fp32) | weights B/param | optimizer B/param | weights + optimizer | "
          "optimizer step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        total = r["weight_bytes_per_param"] + r["optimizer_bytes_per_param"]
        print(f"| {r['variant']} | {r['learned']:.2f} | {r['weight_bytes_per_param']:.0f} | "
              f"{r['optimizer_bytes_per_param']:.0f} | {total:.0f} | {r['optimizer_step_ms']} ms |")


if __name__ == "__main__":
    main()
