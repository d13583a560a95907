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
    python benchmarks/bench_finetune.py --suite --out DIR         # GPU: every workload at its best settings,
                                            # the peers beside, batch-1 decode, within --budget seconds
    python benchmarks/bench_finetune.py --suite --tiny --out DIR  # the same end to end on a CPU, toy shapes
    python benchmarks/bench_finetune.py --suite --estimates --out DIR  # DIR/estimates.jsonl: tune estimate's
                                            # peak for each torchft row (meta tensors, CPU), joined by --suite

The suite runs its rows most telling first within a time budget (benchmarks/gpu_session.sh runs it
with the GPU tests in one command of under 8 minutes): a row expected to cost more than the budget
left is not started, a started row is stopped at the end of the budget, whatever a row raises is
reported as that row's result, and compiler caches and cached device memory are cleared between rows.
After every row, DIR/suite_rows.jsonl (one JSON object per result) and the suite's section of
DIR/RESULTS.md (or --results) are brought up to date, so a run stopped at any point keeps what ended.

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
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    if compile_layers:  # a "compiled" row that fell back to eager, or broke into pieces, says so
        from torch._dynamo.utils import counters

        result.update(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
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


def _timeout(seconds: float) -> float | None:
    """A subprocess limit: None for no limit, at least a second otherwise."""
    return None if seconds == float("inf") else max(seconds, 1)


def run_peers(variants: list[str], tiny: bool, pythonpath: str | None, timeout_s: float) -> list[dict]:
    """The peer variants through the shared harness, in one fresh process (its own memory and compiler
    state). ``pythonpath`` is prepended for torchtune's variants (``tt_*``) only (torchtune and the
    torchao it needs, kept apart from torchft's)."""
    if not PEER_HARNESS.is_file():
        return [dict(peer=v, skipped=f"peer harness not found at {PEER_HARNESS}") for v in variants]
    env = dict(os.environ)
    # torchtune's rows only: peft refuses the older torchao that torchtune needs, so the HF rows run
    # with torchft's packages
    if pythonpath and any(v.startswith("tt_") for v in variants):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    if tiny:
        env["OMP_NUM_THREADS"] = "1"  # toy runs on one CPU thread, as ours (steadier on a shared machine)
    cmd = [sys.executable, str(PEER_HARNESS), *(["--tiny"] if tiny else []), *variants]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=_timeout(timeout_s))
    except subprocess.TimeoutExpired:
        return [dict(peer=v, skipped=f"timed out after {timeout_s:.0f} s") for v in variants]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return [dict(peer=v, skipped=f"harness exited {proc.returncode}: {proc.stderr[-300:]}") for v in variants]
    return _peer_rows(variants[0], lines)


def run_decode(shape: str, timeout_s: float) -> list[dict]:
    """Batch-1 greedy decode rows (benchmarks/bench_decode.py): torchft compiled vs transformers; the toy
    shape runs eager in this process, the others compiled on the GPU in a process of their own."""
    if shape == "tiny":
        from bench_decode import measure

        result = dict(measure("tiny", "cpu", torch.float32, prompt_len=16, new_tokens=8, repeats=1), shape="tiny")
    else:
        cmd = [sys.executable, str(Path(__file__).with_name("bench_decode.py")), "--shape", shape,
               "--device", "cuda", "--dtype", "bf16", "--compile", "--new-tokens", "128", "--repeats", "3", "--json"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_timeout(timeout_s))
            lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
            result = lines[-1] if lines else dict(shape=shape, error=proc.stderr[-300:])
        except subprocess.TimeoutExpired:
            result = dict(shape=shape, error=f"timed out after {timeout_s:.0f} s")
    workload = f"decode_{shape}"
    if "error" in result:
        return [dict(peer="decode", workload=workload, skipped=result["error"])]
    limit = result.get("bandwidth_limit")
    return [dict(peer=name, workload=workload, tokens_per_s=round(speed, 1), peak_gib=peak, mfu=None,
                 bandwidth_fraction=None if not limit else round(speed / limit, 3), same_tokens=result["same_tokens"])
            for name, speed, peak in result["rows"]]


# ---- rows within a time budget ----------------------------------------------------------------------------
@dataclass
class Row:
    """One measurement of a run. ``run(seconds_left)`` returns its result dicts; ``expected_s`` is what it
    costs, compilation included (each result records the ``seconds`` it really took)."""

    workload: str
    peer: str
    settings: str
    expected_s: float
    run: Callable[[float], list[dict]]

    def result(self, **fields) -> dict:
        return dict(peer=self.peer, workload=self.workload, settings=self.settings, **fields)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``TimeoutError`` in this process's main thread once ``seconds`` have passed (SIGALRM)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if seconds == float("inf") or not hasattr(signal, "setitimer") or not in_main_thread:
        yield
        return

    def stop(signum, frame):
        raise TimeoutError(f"stopped at the end of the budget ({seconds:.0f} s were left)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fresh_start() -> None:
    """Leave nothing of one row to the next: dynamo's graphs and guards (the next workload would recompile
    against them or reuse them, and past the recompile limit run eagerly while its row says "compiled"),
    the compile counters, and the device memory the caching allocator holds."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_rows(rows: list[Row], budget_s: float, on_row: Callable[[list[dict]], None] = lambda found: None,
             clock: Callable[[], float] = time.monotonic) -> list[dict]:
    """Run ``rows`` in order within ``budget_s`` seconds and hand each row's results to ``on_row`` as soon
    as it ends. A row expected to cost more than what is left is not started; a started row is stopped at
    the end of the budget; whatever a row raises (out of memory included) is reported as its result."""
    start = clock()
    results = []
    for row in rows:
        left = budget_s - (clock() - start)
        if row.expected_s > left:
            found = [row.result(skipped=f"left out: expects {row.expected_s:.0f} s, "
                                        f"{max(left, 0):.0f} s of the budget left")]
        else:
            began = clock()
            try:
                with time_limit(left):
                    found = row.run(left)
            except Exception as error:  # any failure is this row's result; the next row still runs
                found = [row.result(skipped=f"failed: {type(error).__name__}: {error}"[:400])]
            found = found or [row.result(skipped="the row gave no result")]
            for result in found:
                result["seconds"] = round(clock() - began, 1)
        on_row(found)
        results += found
        if "seconds" in found[0]:
            try:
                fresh_start()
            except Exception as error:  # e.g. a CUDA error the row left: the next rows report their own
                print(f"clearing caches after {row.workload} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return results


def markdown_table(rows: list[dict]) -> str:
    lines = ["| workload | peer and settings | tokens/s | peak GiB | estimated peak GiB | MFU "
             "| decode: share of bandwidth limit |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        name = f"{row['peer']}, {row.get('settings', '')}".rstrip(", ")
        if "skipped" in row:
            lines.append(f"| {row['workload']} | {name} | skipped: {row['skipped']} | | | | |")
            continue

        def cell(value):
            return "n/a" if value is None or value != value else value  # None or NaN: not measurable here

        bandwidth = row.get("bandwidth_fraction")
        lines.append(f"| {row['workload']} | {name} | {row['tokens_per_s']:,} | {cell(row.get('peak_gib'))} | "
                     f"{cell(row.get('estimate_gib', row.get('estimate_error')))} | {cell(row.get('mfu'))} | "
                     f"{'' if bandwidth is None else f'{bandwidth:.0%}'} |")
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
    """$TORCHFT_COMMIT (a copy of the tree without git, e.g. on a lent GPU machine), else git's HEAD."""
    if os.environ.get("TORCHFT_COMMIT"):
        return os.environ["TORCHFT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here)"
    return (head or "unknown") + (" + uncommitted changes" if head and dirty else "")


def write_results(path: Path, tiny: bool, device_name: str, table: str, seconds: float, done: bool = True) -> None:
    """Replace the suite's section of ``path`` (one for the GPU run, one for the CPU toy run)."""
    marker = "suite-cpu-tiny" if tiny else "suite-gpu"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    heading = "CPU toy shapes (a smoke run: says nothing of GPU speed)" if tiny else device_name
    took = f"the suite took {seconds:.0f} s" if done else f"{seconds:.0f} s so far (the suite was still running)"
    section = (f"{begin}\n### `bench_finetune.py --suite{' --tiny' if tiny else ''}`: {heading}\n\n"
               f"Device: {device_name}; {_versions()}; commit {_commit()}; {took}.\n\n"
               f"{table}\n{end}")
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


class SuiteFiles:
    """The suite's output folder, brought up to date after every row, so that a run stopped at any point
    keeps every row that ended: ``suite_rows.jsonl`` (one JSON object per result) and the markdown table
    (the suite's section of ``results``)."""

    def __init__(self, out: Path, results: Path, tiny: bool, device_name: str):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.results, self.tiny, self.device_name = out / "suite_rows.jsonl", results, tiny, device_name
        self.jsonl.write_text("")
        self.rows: list[dict] = []
        self.started = time.perf_counter()

    def add(self, found: list[dict]) -> None:
        self.rows += found
        with self.jsonl.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in found)
        self.write(done=False)

    def write(self, done: bool) -> None:
        write_results(self.results, self.tiny, self.device_name, markdown_table(self.rows),
                      time.perf_counter() - self.started, done)


# ---- what runs ------------------------------------------------------------------------------------------
SETTINGS = {"eager": (False, False), "eager + AC": (False, True), "compiled": (True, False),
            "compiled + AC": (True, True)}  # label -> (compile each layer, activation checkpointing)
# The suite, most telling first (what the budget leaves out is the least needed): (workload, who, torchft
# settings or peer variant or decode shape, expected seconds on one H100/H200 with a cold compile).
# (workload, who, settings, expected seconds). The peers' costs are what they took on an H200
# (2026-12-04: 31.8, 41.1, 23.5, 17.0, 37.4 and 61 s) plus a margin; torchft's are still guesses.
SUITE = [
    ("lora_1b", "torchft", "compiled", 75),
    ("lora_1b", "peer", "tt_lora_best", 45),
    ("qlora_8b", "torchft", "compiled + AC", 100),
    ("full_1b", "torchft", "compiled", 75),
    ("qlora_8b", "peer", "tt_qlora_8b_best_ckpt", 55),
    ("qlora_8b", "torchft", "compiled", 90),
    ("lora_1b", "peer", "hf_peft_lora", 40),
    ("full_1b", "peer", "tt_full_best", 35),
    ("full_1b", "peer", "hf_full", 25),
    ("qlora_8b", "peer", "tt_qlora_8b_best", 50),
    ("decode", "decode", "1b", 70),
    ("decode", "decode", "8b", 90),
]
SUITE_BUDGET_S = 230  # benchmarks/gpu_session.sh: GPU tests + this suite within 8 minutes in all
TINY_ROW_S = 5  # a toy row on a CPU, a process start included
TINY_BUDGET_S = 600


def _torchft_entries(workloads: list[str], suite: bool, tiny: bool) -> list[tuple[str, str, float]]:
    """(workload, settings label, expected seconds) of torchft's rows; on a CPU compiling takes minutes and
    says nothing about GPU speed, so the toy rows run eagerly (with and without AC where the GPU row differs)."""
    if suite:
        entries = [(w, label, cost) for w, who, label, cost in SUITE if who == "torchft" and w in workloads]
    else:
        entries = [(w, label, 60) for w in workloads for label, _, _ in WORKLOADS[w][3]]
    if tiny:
        eager = {(w, "eager + AC" if SETTINGS[label][1] else "eager"): TINY_ROW_S for w, label, _ in entries}
        entries = [(w, label, cost) for (w, label), cost in eager.items()]
    return entries


def plan(workloads: list[str], suite: bool, tiny: bool, peers: bool, measure: dict, estimates: Path | None,
         peer_pythonpath: str | None) -> list[Row]:
    """The rows of a run, in order. ``measure``: the keyword arguments of :func:`measure_torchft` beside the
    workload and settings; ``estimates``: a file of :func:`write_estimates` whose figures join the rows."""

    def torchft_row(workload, label, cost):
        def run(left):
            result = measure_torchft(workload, label, *SETTINGS[label], **measure)
            return [dict(result, **read_estimates(estimates).get((workload, label), {}))]
        return Row(workload, "torchft", label, cost, run)

    def peer_row(workload, variants, cost):
        def run(left):
            return [dict(r, workload=workload) for r in run_peers(variants, tiny, peer_pythonpath, left - 2)]
        return Row(workload, ", ".join(variants), "", cost, run)

    def decode_row(shape, cost):
        return Row(f"decode_{shape}", "decode", "", cost, lambda left: run_decode(shape, left - 2))

    torchft = {(w, label): torchft_row(w, label, cost) for w, label, cost in _torchft_entries(workloads, suite, tiny)}
    if tiny or not suite:  # workload by workload; toy peers share one process per workload
        rows = []
        for workload in workloads:
            rows += [row for (w, _), row in torchft.items() if w == workload]
            variants = ([v for w, who, v, _ in SUITE if w == workload and who == "peer"] if suite
                        else WORKLOADS[workload][4])
            if peers:
                rows += [peer_row(workload, variants, 3 * TINY_ROW_S)] if tiny else [peer_row(workload, [v], 120)
                                                                                      for v in variants]
        return rows + ([decode_row("tiny", TINY_ROW_S)] if suite else [])
    rows = []
    for workload, who, name, cost in SUITE:
        if who == "torchft" and (workload, name) in torchft:
            rows.append(torchft[(workload, name)])
        elif who == "peer" and peers and workload in workloads:
            rows.append(peer_row(workload, [name], cost))
        elif who == "decode" and set(workloads) == set(WORKLOADS):  # decoding rows: the whole suite only
            rows.append(decode_row(name, cost))
    return rows


def estimate_peak_bytes(workload: str, label: str, seq: int, tiny: bool) -> int:
    """tune estimate's prediction (meta tensors, no device) of the peak of the row's step."""
    from torchft.modules.loss import ChunkedCrossEntropy
    from torchft.training.estimate import estimate_step
    from torchft.training.optim import build_adamw

    shape, kind, batch = ("tiny", WORKLOADS[workload][1], 2) if tiny else WORKLOADS[workload][:3]
    model = build_model(shape, kind, torch.device("meta"))
    estimate = estimate_step(model, batch_size=batch, seq_len=seq, loss_fn=ChunkedCrossEntropy(chunk_tokens=1024),
                             make_optimizer=lambda params: build_adamw(params, lr=1e-5),
                             activation_checkpointing=SETTINGS[label][1])
    return estimate.peak_bytes


def write_estimates(path: Path, workloads: list[str], tiny: bool, seq: int) -> None:
    """One line per torchft suite row into ``path``, as each is computed: its estimated peak, or the error.
    It needs no GPU, so benchmarks/gpu_session.sh runs it on a CPU core while the GPU runs the tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    for workload, label, _ in _torchft_entries(workloads, suite=True, tiny=tiny):
        try:
            peak_bytes = estimate_peak_bytes(workload, label, seq, tiny)
            found = dict(estimate_gib=round(peak_bytes / 2**30, 2), estimate_bytes=peak_bytes)
        except Exception as error:  # one failed estimate leaves the others
            found = dict(estimate_error=f"{type(error).__name__}: {error}"[:200])
        with path.open("a") as f:
            f.write(json.dumps(dict(workload=workload, settings=label, **found)) + "\n")


def read_estimates(path: Path | None) -> dict[tuple[str, str], dict]:
    """(workload, settings) -> the estimate fields of that row, from a :func:`write_estimates` file."""
    if path is None or not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(line.pop("workload"), line.pop("settings")): line for line in lines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", choices=[[], *WORKLOADS], default=[], metavar="WORKLOAD",
                        help=f"any of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU, eager only (a smoke run)")
    parser.add_argument("--no-peers", action="store_true", help="measure torchft only")
    parser.add_argument("--suite", action="store_true",
                        help="every workload at its best settings, the peers, batch-1 decode, within --budget")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench",
                        help="folder the suite writes into after every row: suite_rows.jsonl and RESULTS.md")
    parser.add_argument("--results", type=Path, help="the markdown file whose suite section is rewritten "
                                                     "(default: OUT/RESULTS.md)")
    parser.add_argument("--budget", type=float, help=f"seconds the suite may take (default {SUITE_BUDGET_S} on a "
                                                     f"GPU, {TINY_BUDGET_S} for toy shapes)")
    parser.add_argument("--estimates", action="store_true",
                        help="only write OUT/estimates.jsonl: tune estimate's peak for each torchft suite row")
    parser.add_argument("--peer-pythonpath", default=os.environ.get("PEER_PYTHONPATH"),
                        help="prepended to PYTHONPATH for the peers only (torchtune and its torchao)")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    tiny = device.type == "cpu"
    workloads = args.workloads or list(WORKLOADS)
    seq, warmup, steps = (64, 1, 3) if tiny else (2048, 3, 10)
    if args.suite:  # the suite must end within minutes, compilation included
        warmup, steps = (1, 1) if tiny else (2, 6)
    if tiny:
        torch.set_num_threads(1)  # steadier timings on a shared machine
    estimates = args.out / "estimates.jsonl"
    if args.estimates:
        write_estimates(estimates, workloads, tiny, seq)
        return
    rows = plan(workloads, args.suite, tiny, not args.no_peers,
                dict(seq=seq, warmup=warmup, steps=steps, device=device), estimates, args.peer_pythonpath)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy shapes)"
    files = SuiteFiles(args.out, args.results or args.out / "RESULTS.md", tiny, device_name) if args.suite else None

    def on_row(found: list[dict]) -> None:
        for row in found:
            print(json.dumps(row), flush=True)
        if files is not None:
            files.add(found)

    budget = float("inf")  # a single workload's rows run to the end
    if args.suite:
        budget = args.budget or (TINY_BUDGET_S if tiny else SUITE_BUDGET_S)
    results = run_rows(rows, budget, on_row)
    print(f"\n{device_name}, torch {torch.__version__}\n\n{markdown_table(results)}")
    if files is not None:
        files.write(done=True)
        print(f"\nwritten into {files.results} and {files.jsonl}")


if __name__ == "__main__":
    main()
