"""The bf16 optimizer step alone, against torch's fused AdamW over the same parameter shapes.

Shapes: Llama 3.2 1B full fine-tuning (embedding, 16 layers of 9 weights, final norm) and its LoRA
rank-8 adapters on q/v (64 small matrices). Per case: torchft's StochasticRoundingAdamW on bf16
weights, torch fused AdamW on bf16 weights and on fp32 weights; the first step (with compilation),
the median of 20 later steps (the variants' steps interleaved), the extra peak memory of a step
(CUDA: max_memory_allocated; CPU: peak RSS, Linux), and the compilations counted.

    python benchmarks/bench_bf16_optimizer_step.py [--layers N]       # CUDA (the full 1B: ~10 GB)
    python benchmarks/bench_bf16_optimizer_step.py --layers 1         # CPU: ~11 GB of RAM
"""
import argparse
import json
import statistics
import time

import torch

from bench_bf16_optimizer import _reset_peak_rss, _rss_bytes
from torchft.training.optim import build_adamw


def shapes(kind: str, layers: int, tiny: bool = False) -> list[tuple[int, ...]]:
    # Llama 3.2 1B; --tiny: the same list of weights at toy sizes (the CPU dry run of the GPU session)
    dim, kv, hidden, vocab, rank = (64, 32, 128, 256, 8) if tiny else (2048, 512, 8192, 128256, 8)
    if kind == "lora":
        return [(rank, dim), (dim, rank), (rank, dim), (kv, rank)] * layers
    layer = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden), (dim,), (dim,)]
    return [(vocab, dim)] + layer * layers + [(dim,)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


VARIANTS = ("torchft SR", "fused bf16", "fused fp32")


def build(kind: str, variant: str, layers: int, device: torch.device, tiny: bool):
    torch.manual_seed(0)
    dtype = torch.float32 if variant == "fused fp32" else torch.bfloat16
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes(kind, layers, tiny)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = (build_adamw(params, lr=1e-5) if variant == "torchft SR" else
           torch.optim.AdamW(params, lr=1e-5, fused=True))
    return params, opt


def timed_step(opt, device: torch.device) -> tuple[float, int]:
    """One step's seconds and the extra peak memory it took (CUDA: allocated; CPU: RSS, Linux)."""
    sync(device)
    before = _reset_peak(device)
    start = time.perf_counter()
    opt.step()
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, _peak(device) - before


def _reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _reset_peak_rss()


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")


def run(kind: str, layers: int, device: torch.device, steps: int = 20, tiny: bool = False) -> list[dict]:
    """Every variant on the same shapes, their steps interleaved (a busy machine slows them alike)."""
    from torch._dynamo.utils import counters

    rows = []
    built = {variant: build(kind, variant, layers, device, tiny) for variant in VARIANTS}
    times = {variant: [] for variant in VARIANTS}
    extra = {variant: [] for variant in VARIANTS}
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(steps + 1):
        for variant in VARIANTS:
            seconds, extra_bytes = timed_step(built[variant][1], device)
            times[variant].append(seconds)
            extra[variant].append(extra_bytes)
    for variant in VARIANTS:
        params = built[variant][0]
        n = sum(p.numel() for p in params)
        largest = max(p.numel() for p in params)
        rows.append(dict(kind=kind, variant=variant, tensors=len(params), params_m=round(n / 1e6, 1),
                         first_step_s=round(times[variant][0], 2),
                         step_ms=round(1e3 * statistics.median(times[variant][1:]), 3),
                         extra_peak_mib=round(max(extra[variant][1:]) / 2**20, 1),
                         largest_param_fp32_mib=round(4 * largest / 2**20, 1),
                         compiled_graphs=counters["stats"]["unique_graphs"] - graphs if variant == VARIANTS[0] else 0))
    rows[0]["step_vs_fused_bf16"] = round(rows[0]["step_ms"] / rows[1]["step_ms"], 2)  # target: <= 1.3
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a dry run on the CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda"
                          else "cpu")), flush=True)
    for kind in ("full", "lora"):
        for row in run(kind, args.layers, device, tiny=args.tiny):
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
