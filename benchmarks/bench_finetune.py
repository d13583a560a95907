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
    python benchmarks/bench_finetune.py --suite         # GPU: every workload at its best settings, the
                                                        # peers beside, batch-1 decode; table into RESULTS.md
    python benchmarks/bench_finetune.py --suite --tiny  # the same end to end on a CPU with toy shapes

Workloads (shapes of the public configs):
    lora_1b   Llama-3.2-1B, LoRA rank 16 / alpha 32 on q,k,v,o,gate,up,down, batch 4 x 2048
    qlora_8b  Llama-3.1-8B, QLoRA (NF4 base), same adapters, batch 2 x 2048, with and without AC
    full_1b   Llama-3.2-1B, full fine-tuning, batch 4 x 2048

Prints one JSON line per measurement, then a markdown table (paste it into benchmarks/RESULTS.md).
MFU = tokens/s x model FLOPs per token / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM),
with FLOPs per token = 6 N (full fine-tuning: forward, input and weight gradients) or 4 N (adapters:
no weight gradients for the frozen base) over the N matmul parameters, + 12 L d s for attention
(docs/finetuning.md). Decode is reported against the memory-bandwidth limit: bandwidth / weight bytes
tokens/s at batch 1.
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

from peer_harness import peer_harness_dir

REPO = Path(__file__).resolve().parents[1]
PEER_HARNESS = peer_harness_dir() / "bench_peers.py"

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
    loss_fn = ChunkedCrossEntropy(chunk_tokens=1024, compile=compile_layers)
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


def mfu_of(shape: str, full_finetune: bool, seq: int, tokens_per_s: float, device: torch.device) -> float | None:
    """MFU by the formula of the module docstring, the same for every peer (None where the peak is unknown)."""
    from types import SimpleNamespace

    from torchft.training.throughput import model_flops_per_token, peak_flops

    peak = peak_flops(device)
    dims = SHAPES[shape]
    args = SimpleNamespace(head_dim=dims["embed_dim"] // dims["num_heads"], **dims)
    return round(tokens_per_s * model_flops_per_token(args, seq, full_finetune) / peak, 3) if peak else None


def _peer_rows(variant: str, lines: list[dict]) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for line in lines:
        name = line.get("variant", variant)
        if "error" in line:
            missing = "torchtune" in line["error"] or "No module named" in line["error"]
            rows.append(dict(peer=name, skipped="not installed here" if missing else line["error"]))
        else:
            rows.append(dict(peer=name, tokens_per_s=line["tok_s"], step_s=line["step_s"], peak_gib=line["peak_gib"],
                             mfu=mfu_of(line["shape"], "full" in name, line["seq"], line["tok_s"], device),
                             shape=line["shape"], batch=line["bs"], seq=line["seq"]))
    return rows


def run_peers(variants: list[str], tiny: bool, pythonpath: str | None = None, timeout_s: float = 240,
              deadline: float | None = None) -> list[dict]:
    """The peer variants through the shared harness: each in its own process (fresh memory) on a GPU,
    all in one process for the toy CPU run. ``pythonpath`` is prepended for the peers only (torchtune
    and the torchao it needs, kept apart from torchft's)."""
    if not PEER_HARNESS.is_file():
        return [dict(peer=v, skipped=f"peer harness not found at {PEER_HARNESS}") for v in variants]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    if tiny:
        env["OMP_NUM_THREADS"] = "1"  # toy runs on one CPU thread, as ours (steadier on a shared machine)
    groups = [variants] if tiny else [[v] for v in variants]
    results = []
    for group in groups:
        limit = timeout_s if deadline is None else min(timeout_s, deadline - time.perf_counter())
        if limit < 20:
            results += [dict(peer=v, skipped="left out: the suite's time budget was spent") for v in group]
            continue
        cmd = [sys.executable, str(PEER_HARNESS), *(["--tiny"] if tiny else []), *group]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            results += [dict(peer=v, skipped=f"timed out after {limit:.0f} s") for v in group]
            continue
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            results += [dict(peer=v, skipped=f"harness exited {proc.returncode}: {proc.stderr[-300:]}") for v in group]
            continue
        results += _peer_rows(group[0], lines)
    return results


# The suite: every workload at torchft's best settings (with and without AC where memory is the point),
# the peers' best settings beside it, then batch-1 decode.
# Most telling first: when the time budget runs out, what is left out is the least needed.
SUITE = {
    "lora_1b": ([("compiled", True, False)], ["tt_lora_best", "hf_peft_lora"]),
    "qlora_8b": ([("compiled + AC", True, True), ("compiled", True, False)],
                 ["tt_qlora_8b_best_ckpt", "tt_qlora_8b_best"]),
    "full_1b": ([("compiled", True, False)], ["tt_full_best", "hf_full"]),
}
SUITE_BUDGET_S = 480  # the suite must end within 8 minutes on one GPU, compilation included
DECODE_SHAPES = ("1b", "8b")


def run_decode(tiny: bool, timeout_s: float = 240, deadline: float | None = None) -> list[dict]:
    """Batch-1 greedy decode rows (benchmarks/bench_decode.py): torchft compiled vs transformers."""
    if tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_decode import measure

        results = [dict(measure("tiny", "cpu", torch.float32, prompt_len=16, new_tokens=8, repeats=1), shape="tiny")]
    else:
        results = []
        for shape in DECODE_SHAPES:
            limit = timeout_s if deadline is None else min(timeout_s, deadline - time.perf_counter())
            if limit < 20:
                results.append(dict(shape=shape, error="left out: the suite's time budget was spent"))
                continue
            cmd = [sys.executable, str(Path(__file__).with_name("bench_decode.py")), "--shape", shape,
                   "--device", "cuda", "--dtype", "bf16", "--compile", "--new-tokens", "128", "--repeats", "3",
                   "--json"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
                lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
                results.append(lines[-1] if lines else dict(shape=shape, error=proc.stderr[-300:]))
            except subprocess.TimeoutExpired:
                results.append(dict(shape=shape, error=f"timed out after {limit:.0f} s"))
    rows = []
    for result in results:
        workload = f"decode_{result['shape']}"
        if "error" in result:
            rows.append(dict(peer="decode", workload=workload, skipped=result["error"]))
            continue
        limit = result.get("bandwidth_limit")
        for name, speed, peak in result["rows"]:
            rows.append(dict(peer=name, workload=workload, tokens_per_s=round(speed, 1), peak_gib=peak,
                             mfu=None, bandwidth_fraction=None if not limit else round(speed / limit, 3),
                             same_tokens=result["same_tokens"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| workload | peer and settings | tokens/s | peak GiB | MFU | decode: share of bandwidth limit |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        name = f"{row['peer']}, {row.get('settings', '')}".rstrip(", ")
        if "skipped" in row:
            lines.append(f"| {row['workload']} | {name} | skipped: {row['skipped']} | | | |")
            continue

        def cell(value):
            return "n/a" if value is None or value != value else value  # None or NaN: not measurable here

        bandwidth = row.get("bandwidth_fraction")
        lines.append(f"| {row['workload']} | {name} | {row['tokens_per_s']:,} | {cell(row.get('peak_gib'))} | "
                     f"{cell(row.get('mfu'))} | {'' if bandwidth is None else f'{bandwidth:.0%}'} |")
    return "\n".join(lines)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for package in ("transformers", "peft", "torchao"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def _commit() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def write_results(path: Path, tiny: bool, device_name: str, table: str, seconds: float) -> None:
    """Replace the suite's section of RESULTS.md (one for the GPU run, one for the CPU toy run)."""
    marker = "suite-cpu-tiny" if tiny else "suite-gpu"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    heading = "CPU toy shapes (a smoke run: says nothing of GPU speed)" if tiny else device_name
    section = (f"{begin}\n### `bench_finetune.py --suite{' --tiny' if tiny else ''}`: {heading}\n\n"
               f"Device: {device_name}; {_versions()}; commit {_commit()}; the suite took {seconds:.0f} s.\n\n"
               f"{table}\n{end}")
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", choices=[[], *WORKLOADS], default=[], metavar="WORKLOAD",
                        help=f"any of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU, eager only (a smoke run)")
    parser.add_argument("--no-peers", action="store_true", help="measure torchft only")
    parser.add_argument("--suite", action="store_true",
                        help="every workload at its best settings, the peers, batch-1 decode; writes RESULTS.md")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
                        help="the file --suite writes its table into")
    parser.add_argument("--peer-pythonpath", default=os.environ.get("PEER_PYTHONPATH"),
                        help="prepended to PYTHONPATH for the peers only (torchtune and its torchao)")
    args = parser.parse_args()

    started = time.perf_counter()
    deadline = started + SUITE_BUDGET_S if args.suite else None
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    tiny = device.type == "cpu"
    seq, warmup, steps = (64, 1, 3) if tiny else (2048, 3, 10)
    if args.suite:  # the suite must end within minutes, compilation included
        warmup, steps = (1, 1) if tiny else (2, 6)
    if tiny:
        torch.set_num_threads(1)  # steadier timings on a shared machine
    plan = {w: SUITE[w] for w in (args.workloads or SUITE)} if args.suite else {
        w: WORKLOADS[w][3:] for w in (args.workloads or WORKLOADS)}
    rows = []
    for workload, (settings, peers) in plan.items():
        if tiny:  # compiling on a CPU takes minutes and says nothing about GPU speed: eager only
            settings = list({("eager + AC" if ac else "eager", False, ac): None for _, _, ac in settings})
        for label, compile_layers, checkpointing in settings:
            if deadline is not None and time.perf_counter() > deadline - 20:
                rows.append(dict(peer="torchft", workload=workload, settings=label,
                                 skipped="left out: the suite's time budget was spent"))
                continue
            try:
                row = measure_torchft(workload, label, compile_layers, checkpointing, seq, warmup, steps, device)
            except torch.OutOfMemoryError:
                row = dict(peer="torchft", workload=workload, settings=label, skipped="out of memory")
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not args.no_peers:
            for row in run_peers(peers, tiny, args.peer_pythonpath, deadline=deadline):
                row["workload"] = workload
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.suite:
        for row in run_decode(tiny, deadline=deadline):
            print(json.dumps(row), flush=True)
            rows.append(row)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy shapes)"
    table = markdown_table(rows)
    print(f"\n{device_name}, torch {torch.__version__}\n\n{table}")
    if args.suite:
        write_results(args.results, tiny, device_name, table, time.perf_counter() - started)
        print(f"\nwritten into {args.results}")


if __name__ == "__main__":
    main()
