"""``tune estimate --config <config> [overrides]``: the peak GPU memory of a config, before running it."""
from __future__ import annotations

import argparse
import json

from torchft import registry
from torchft.cli._common import add_subcommand

EPILOG = """\
examples:
  tune estimate --config llama3_1/8B_qlora_single_device
  tune estimate --config llama3_2/1B_lora_single_device batch_size=8 --gpu-memory 24GiB
  tune estimate --config my_config.yaml --gpu-memory 80GB --json
  tune estimate --config my_fsdp_config.yaml --nproc-per-node 8

One training step of the config's model, loss and optimizer runs on meta tensors (no GPU, no weights;
dimensions from the model builder or the checkpoint folder's config.json), every sample max_seq_len
tokens long. The peak is what torch.cuda.max_memory_allocated would report (the 64 MiB of cuBLAS
workspaces included); "needed" adds the allocator overhead assumed (5% fragmentation + 0.75 GiB CUDA
context). With --nproc-per-node N, batch_size is the global batch (each rank runs batch_size / N) and
the config's cpu_offload and fp32_reduce apply. With --gpu-memory, a config that does not fit gets the
cheapest settings that make it fit.
"""

KIND_LABELS = {
    "weights": "weights",
    "quantized_base": "quantized base weights",
    "teacher_weights": "teacher weights (frozen)",
    "adapters": "adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "saved_activations": "saved activations",
    "temporaries": "temporaries",
    "loss_chunks": "loss chunks",
    "all_gather_buffers": "FSDP all-gather buffers",
    "reduce_scatter_buffers": "FSDP reduce-scatter buffers",
    "cublas_workspaces": "cuBLAS workspaces",
}


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "estimate",
        help="predict the peak GPU memory of a config without a GPU",
        description="Predict the peak GPU memory of a fine-tuning config (shipped name or YAML path).",
        epilog=EPILOG,
    )
    parser.add_argument("--config", required=True, help="config name (see `tune ls`) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.add_argument("--gpu-memory", help="GPU memory to check against, e.g. 24GiB, 80GB")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="ranks of a distributed (FSDP2) run; the estimate is per rank")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=main)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _batch(settings: dict) -> str:
    per_rank = settings.get("batch_size_per_rank")
    return f"batch {settings['batch_size']}" + (f" ({per_rank} per rank)" if per_rank is not None else "")


def _tiles(settings: dict) -> str:
    tile = settings.get("tiled_mlp_tokens")
    return "" if tile is None else f", MLP in tiles of {tile} tokens"


def _ranks(settings: dict) -> str:
    if settings.get("nproc_per_node", 1) == 1:
        return ""
    return (f", per rank of {settings['nproc_per_node']} (cpu_offload {_on(settings['cpu_offload'])}, "
            f"fp32_reduce {_on(settings['fp32_reduce'])})")


def _per_param(kind: str, nbytes: int, settings: dict) -> str:
    """The optimizer states' bytes per trainable parameter (each rank holds 1/N of them under FSDP2)."""
    trainable = settings.get("trainable_params")
    if kind != "optimizer_states" or not trainable or not nbytes:
        return ""
    return f"  ({nbytes * settings.get('nproc_per_node', 1) / trainable:.1f} bytes per trainable parameter)"


def main(args: argparse.Namespace) -> int:
    from torchft.training.estimate import (CUBLAS_WORKSPACE_BYTES, estimate_memory, parse_memory_size,
                                          shortest_advised_seq, ways_to_fit)

    gpu_bytes = parse_memory_size(args.gpu_memory) if args.gpu_memory else None
    estimate = estimate_memory(args.config, args.overrides, nproc_per_node=args.nproc_per_node)
    fix = None
    if gpu_bytes is not None and not estimate.fits(gpu_bytes):
        fix = ways_to_fit(args.config, args.overrides, gpu_bytes, nproc_per_node=args.nproc_per_node)
    if args.json:
        result = estimate.to_dict(gpu_bytes)
        result["config"] = args.config
        result["fits_with"] = None if fix is None else {"overrides": fix[0], "peak_gib": round(fix[1].peak_gib, 3)}
        print(json.dumps(result))
        return _exit_status(estimate, gpu_bytes)
    s = estimate.settings
    found = registry.find_config(args.config)
    if found and found[0].name.endswith("_distributed") and args.nproc_per_node == 1:
        print(f"note: {args.config} runs under torchrun; pass --nproc-per-node N for the per-rank estimate")
    print(f"{args.config}: {_batch(s)} x {s['seq_len']} tokens (accumulation {s['gradient_accumulation_steps']}), "
          f"activation checkpointing {_on(s['activation_checkpointing'])}, "
          f"offloading {_on(s['activation_offloading'])}{_tiles(s)}{_ranks(s)}")
    print(f"peak {_memory_kind(args.config, args.overrides)} (allocated): {_gib(estimate.peak_bytes)}")
    for kind, nbytes in estimate.breakdown.items():
        print(f"  {KIND_LABELS.get(kind, kind):<28}{_gib(nbytes):>12}{_per_param(kind, nbytes, s)}")
    if estimate.host_bytes:
        what = "offloaded activations and the cpu_offload state" if s.get("cpu_offload") else "offloaded activations"
        print(f"host (pinned CPU) memory for {what}: {_gib(estimate.host_bytes)}")
    print(f"needed with allocator overhead (+5% fragmentation, +0.75 GiB CUDA context; the peak includes "
          f"{CUBLAS_WORKSPACE_BYTES // 2**20} MiB of cuBLAS workspaces): {_gib(estimate.needed_bytes)}")
    if gpu_bytes is not None:
        if estimate.fits(gpu_bytes):
            print(f"fits in {_gib(gpu_bytes)}")
        elif fix is not None:
            print(f"does not fit in {_gib(gpu_bytes)}; fits with: {' '.join(fix[0])} "
                  f"(peak {_gib(fix[1].peak_bytes)}, needed {_gib(fix[1].needed_bytes)})")
        else:
            print(f"does not fit in {_gib(gpu_bytes)}, even with activation checkpointing, offloading, batch size 1, "
                  f"QLoRA and sequences of {shortest_advised_seq(s['seq_len'])} tokens")
    return _exit_status(estimate, gpu_bytes)


def _exit_status(estimate, gpu_bytes: int | None) -> int:
    """1 when --gpu-memory was given and the config does not fit in it (as it is), so scripts can tell."""
    return 1 if gpu_bytes is not None and not estimate.fits(gpu_bytes) else 0


def _memory_kind(config: str, overrides) -> str:
    """What the peak is counted in: GPU memory for a CUDA config; a CPU config holds it in host memory."""
    from torchft.config import load_config

    device = str(load_config(config, overrides).get("device", "cuda"))
    return "GPU memory" if device.startswith(("cuda", "auto")) else f"memory on the {device} (host memory)"
