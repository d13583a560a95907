"""Peak memory of loading a 1B-shaped HF checkpoint: build on meta, load memory-mapped with assign=True.

    python benchmarks/load_memory.py            # generates ~2.5 GB in a temp folder, then measures
    python benchmarks/load_memory.py --dir D    # reuse / keep the generated checkpoint in D

The checkpoint has the Llama 3.2 1B dimensions (1.24B parameters, bf16, tied embeddings) with random
weights, written by ``save_hf_checkpoint``. Each measurement runs in a fresh Python process and reads
its own peak resident set (VmHWM) after the load and after touching every weight (a checksum over all
parameters and a 4-token forward pass), so the file's pages are really resident, not merely mapped.

Two loads are measured:
  torchft  -- ``build on meta`` + ``load_hf_checkpoint`` + ``load_state_dict(sd, assign=True)``
  copy     -- the naive path for contrast: build with real (bf16) weights, then ``load_state_dict(sd)``
              copies the file's tensors into them (two copies at the peak)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # bytes
    return fields

mode, folder = sys.argv[1], sys.argv[2]
from torchft.checkpoint import load_hf_checkpoint
from torchft.models.llama3_2 import llama3_2_1b
baseline = status()["VmRSS"]
start = time.perf_counter()
if mode == "torchft":
    with torch.device("meta"):
        model = llama3_2_1b()
    model.load_state_dict(load_hf_checkpoint(folder), assign=True)
else:
    torch.set_default_dtype(torch.bfloat16)
    model = llama3_2_1b()
    model.load_state_dict(load_hf_checkpoint(folder))
load_s = time.perf_counter() - start
after_load = status()
total = 0.0
with torch.no_grad():
    for p in model.parameters():  # read every byte, a block at a time
        for block in p.detach().flatten().split(1 << 24):
            total += block.float().sum().item()
    model.eval()(torch.arange(4).unsqueeze(0))
print(json.dumps({"baseline_rss": baseline, "after_load": after_load, "after_touch": status(),
                  "load_s": load_s, "checksum": total}))
"""


def generate(folder: Path) -> None:
    import torch

    from torchft.checkpoint import save_hf_checkpoint
    from torchft.models.llama3_2 import llama3_2_1b

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama3_2_1b().state_dict().items()}
        args = llama3_2_1b().args
    gen = torch.Generator().manual_seed(0)
    state_dict = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) for k, s in shapes.items()}
    save_hf_checkpoint(state_dict, folder, config=args, max_shard_size="1GB", overwrite=True)


def measure(mode: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="checkpoint folder (generated when it has no weights)")
    parser.add_argument("--skip-copy", action="store_true", help="measure only the torchft load")
    opts = parser.parse_args()

    import torch

    tmp = None
    folder = opts.dir
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="torchft-load-memory-")
        folder = Path(tmp.name) / "llama3_2_1b"
    if not (folder / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        generate(folder)
        print(f"generated {folder} in {time.perf_counter() - start:.0f} s")
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    gib = 2**30
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}; torch {torch.__version__}")
    print(f"checkpoint: {file_bytes / gib:.2f} GiB of safetensors (Llama 3.2 1B shapes, bf16)")
    for mode in ("torchft", "copy")[: 1 if opts.skip_copy else 2]:
        r = measure(mode, folder)
        peak = r["after_touch"]["VmHWM"]
        print(f"{mode:8s} load {r['load_s']:5.1f} s | peak RSS {peak / gib:.2f} GiB = {peak / file_bytes:.2f}x file "
              f"| after load {r['after_load']['VmRSS'] / gib:.2f} GiB | before load (imports) "
              f"{r['baseline_rss'] / gib:.2f} GiB | peak - imports {(peak - r['baseline_rss']) / file_bytes:.2f}x file")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
