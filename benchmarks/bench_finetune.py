"""Fine-tuning step throughput and peak memory: torchft next to HF transformers + PEFT and torchtune.

Every workload runs in this one invocation, on the same device, with the same shapes: random weights
and random tokens (throughput and memory do not depend on them), bf16, AdamW, batch x sequence as
listed, the median step of STEPS after WARMUP warm-up steps. torchft runs the recipes' own step
(``torchft.training.steps.forward_backward`` with the chunked cross-entropy, then the optimizer);
the peers run through the shared peer harness (``../shared/bench/bench_peers.py``, one subprocess
per peer variant) when it is present, and a peer that is not installed is reported as skipped.

    python benchmarks/bench_finetune.py                 # GPU: the three workloads below
    python benchmarks/bench_finetune.py --tiny          # CPU, toy shapes (eager only), about a minute
    python benchmarks/bench_finetune.py lora_1b         # one workload

Workloads (shapes of the public configs):
    lora_1b   Llama-3.2-1B, LoRA rank 16 / alpha 32 on q,k,v,o,gate,up,down, batch 4 x 2048
    qlora_8b  Llama-3.1-8B, QLoRA (NF4 base), same adapters, batch 2 x 2048, with and without AC
    full_1b   Llama-3.2-1B, full fine-tuning, batch 4 x 2048

Prints one JSON line per measurement, then a markdown table (paste it into benchmarks/RESULTS.md).
MFU uses the formula of docs/finetuning.md (6N or 4N + 12 L d s per token) and the GPU's dense
bf16 peak.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEER_HARNESS = REPO.parent / "shared" / "bench" / "bench_peers.py"

SHAPES = {
    "1b": dict(vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
               intermediate_dim=8192, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
               intermediate_dim=14336, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                 tie_word_embeddings=True),
}
ROPE_3_1 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
LORA = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True, lora_rank=16,
            lora_alpha=32.0)

# workload -> (shape, kind, batch, [(label, compile, activation checkpointing)], peer variants)
WORKLOADS = {
    "lora_1b": ("1b", "lora", 4, [("eager", False, False), ("compiled", True, False)],
                ["hf_peft_lora", "tt_lora", "tt_lora_best"]),
    "qlora_8b": ("8b", "qlora", 2, [("compiled + AC", True, True), ("compiled", True, False)],
                 ["tt_qlora_8b_best_ckpt", "tt_qlora_8b_best"]),
    "full_1b": ("1b", "full", 4, [("eager", False, False), ("compiled", True, False)],
                ["hf_full", "tt_full_best"]),
}


def build_model(shape: str, kind: str, device: torch.device):
    """A random-weight torchft model of ``shape`` in bf16 on ``device``, adapters trainable for LoRA/QLoRA."""
    from torchft.models import llama
    from torchft.modules.peft import get_adapter_params, set_trainable_params
    from torchft.training.setup import default_dtype

    dims = dict(SHAPES[shape], max_seq_len=131072, rope_base=500000.0,
                rope_scaling=ROPE_3_1 if shape == "8b" else None)
    adapters = {} if kind == "full" else dict(LORA, quantize_base=(kind == "qlora"))
    with torch.device(device), default_dtype(torch.bfloat16):
        model = llama(**dims, **adapters)
    if kind != "full":
        set_trainable_params(model, get_adapter_params(model))
    return model


def measure_torchft(workload: str, label: str, compile_layers: bool, checkpointing: bool, seq: int,
                    warmup: int, steps: int, device: torch.device) -> dict:
    from torchft.modules.loss import ChunkedCrossEntropy, output_params
    from torchft.training.activations import apply_activation_checkpointing
    from torchft.training.compile import compile_layers as compile_each_layer
    from torchft.training.optim import build_adamw
    from torchft.training.steps import forward_backward
    from torchft.training.throughput import memory_stats, model_flops_per_token, peak_flops, reset_peak_memory

    shape, kind, batch = WORKLOADS[workload][:3]
    if device.type == "cpu":  # the peer harness's toy workload: tiny shape, batch 2 x 64
        shape, batch = "tiny", 2
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        reset_peak_memory(device)
    model = build_model(shape, kind, device)
    if checkpointing:
        apply_activation_checkpointing(model)
    if compile_layers:
        compile_each_layer(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(trainable, lr=1e-5)
    loss_fn = ChunkedCrossEntropy(num_chunks=8, compile=compile_layers)
    loss_params = output_params(model)
    vocab = SHAPES[shape]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(model, [{"tokens": tokens, "labels": labels}], loss_fn, loss_params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens_per_s = batch * seq / step
    peak = peak_flops(device)
    mfu = tokens_per_s * model_flops_per_token(model.args, seq, kind == "full") / peak if peak else None
    memory = memory_stats(device)
    result = dict(peer="torchft", workload=workload, settings=label, shape=shape, batch=batch, seq=seq,
                  tokens_per_s=round(tokens_per_s), step_s=round(step, 4),
                  peak_gib=round(memory.get("peak_memory_alloc_gib", float("nan")), 2),
                  mfu=None if mfu is None else round(mfu, 3))
    del model, optimizer
    return result


def run_peers(variants: list[str], tiny: bool) -> list[dict]:
    """Each peer variant in its own process (fresh memory), through the shared harness."""
    if not PEER_HARNESS.is_file():
        return [dict(peer=v, skipped=f"peer harness not found at {PEER_HARNESS}") for v in variants]
    results = []
    for variant in variants:
        cmd = [sys.executable, str(PEER_HARNESS), *(["--tiny"] if tiny else []), variant]
        # toy runs on one CPU thread, as ours (steadier on a shared machine)
        env = dict(os.environ, OMP_NUM_THREADS="1") if tiny else None
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            results.append(dict(peer=variant, skipped=f"harness exited {proc.returncode}: {proc.stderr[-300:]}"))
            continue
        for line in lines:
            if "error" in line:
                missing = "torchtune" in line["error"] or "No module named" in line["error"]
                reason = "not installed here" if missing else line["error"]
                results.append(dict(peer=variant, skipped=reason))
            else:
                results.append(dict(peer=variant, tokens_per_s=line["tok_s"], step_s=line["step_s"],
                                    peak_gib=line["peak_gib"], mfu=line.get("mfu_est"), shape=line["shape"],
                                    batch=line["bs"], seq=line["seq"]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", choices=[[], *WORKLOADS], default=[], metavar="WORKLOAD",
                        help=f"any of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU, eager only (a smoke run)")
    parser.add_argument("--no-peers", action="store_true", help="measure torchft only")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    tiny = device.type == "cpu"
    seq, warmup, steps = (64, 1, 3) if tiny else (2048, 3, 10)
    if tiny:
        torch.set_num_threads(1)  # steadier timings on a shared machine
    rows = []
    for workload in args.workloads or list(WORKLOADS):
        shape, kind, batch, settings, peers = WORKLOADS[workload]
        if tiny:  # compiling on a CPU takes minutes and says nothing about GPU speed: eager only
            settings = list({("eager + AC" if ac else "eager", False, ac): None for _, _, ac in settings})
        for label, compile_layers, checkpointing in settings:
            try:
                row = measure_torchft(workload, label, compile_layers, checkpointing, seq, warmup, steps, device)
            except torch.OutOfMemoryError:
                row = dict(peer="torchft", workload=workload, settings=label, skipped="out of memory")
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not args.no_peers:
            for row in run_peers(peers, tiny):
                row["workload"] = workload
                print(json.dumps(row), flush=True)
                rows.append(row)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy shapes)"
    print(f"\n{device_name}, torch {torch.__version__}\n")
    print("| workload | peer and settings | tokens/s | peak GiB | MFU |")
    print("|---|---|---|---|---|")
    for row in rows:
        name = f"{row['peer']}, {row.get('settings', '')}".rstrip(", ")
        if "skipped" in row:
            print(f"| {row['workload']} | {name} | skipped: {row['skipped']} | | |")
        else:
            mfu, peak = row.get("mfu"), row.get("peak_gib")
            mfu = "n/a" if mfu is None or mfu != mfu else mfu  # None or NaN: no known peak FLOP/s (CPU)
            peak = "n/a" if peak is None or peak != peak else peak
            print(f"| {row['workload']} | {name} | {row['tokens_per_s']:,} | {peak} | {mfu} |")


if __name__ == "__main__":
    main()
