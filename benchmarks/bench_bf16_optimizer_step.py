"""The bf16 optimizer step alone, against torch's fused AdamW over the same parameter shapes.

Shapes: Llama 3.2 1B full fine-tuning (embedding, 16 layers of 9 weights, final norm) and its LoRA
rank-8 adapters on q/v (64 small matrices). Per case: torchft's StochasticRoundingAdamW on bf16
weights, torch fused AdamW on bf16 weights and on fp32 weights; the first step (with compilation),
the median of 20 later steps, the extra peak memory of a step (CUDA: max_memory_allocated), and
the compilations counted.

    python benchmarks/bench_bf16_optimizer_step.py [--layers N]       # CUDA (the full 1B: ~10 GB)
"""
import argparse
import json
import statistics
import time

import torch

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


def run(kind: str, variant: str, layers: int, device: torch.device, steps: int = 20, tiny: bool = False) -> dict:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    dtype = torch.float32 if variant == "fused fp32" else torch.bfloat16
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes(kind, layers, tiny)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = (build_adamw(params, lr=1e-5) if variant == "torchft SR" else
           torch.optim.AdamW(params, lr=1e-5, fused=True))
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for i in range(steps + 1):
        sync(device)
        if device.type == "cuda" and i == steps:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    extra = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
    n = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    return dict(kind=kind, variant=variant, tensors=len(params), params_m=round(n / 1e6, 1),
                first_step_s=round(times[0], 2), step_ms=round(1e3 * statistics.median(times[1:]), 3),
                extra_peak_mib=None if extra is None else round(extra / 2**20, 1),
                largest_param_fp32_mib=round(4 * largest / 2**20, 1),
                compiled_graphs=counters["stats"]["unique_graphs"] - graphs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a dry run on the CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda"
                          else "cpu")), flush=True)
    for kind in ("full", "lora"):
        for variant in ("torchft SR", "fused bf16", "fused fp32"):
            print(json.dumps(run(kind, variant, args.layers, device, tiny=args.tiny)), flush=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
