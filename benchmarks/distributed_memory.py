"""Per-rank memory of FSDP2 full fine-tuning at world size 1, 2 and 4, on CPU processes (gloo).

    python benchmarks/distributed_memory.py            # launches torchrun 3 times, prints a table

A Llama-architecture model (4 layers, dim 512, 17M parameters: 67 MiB in fp32, random weights written once
to a temporary HF folder) is built on meta, sharded per decoder layer + root, and streamed in from
the memory-mapped files; then 2 full fine-tuning steps (AdamW) run on random tokens. Each rank
reports: the bytes of weights it holds, the growth of its anonymous memory (RssAnon: not the
page-cache pages of the memory-mapped file) at the end of loading and at the end of the steps
(weights + gradients + AdamW state + activations and allocator caches), measured from just before
loading (after a warm-up step on a 2x2 layer, which pays the lazy imports of backward and AdamW).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = dict(num_layers=4, embed_dim=512, num_heads=8, num_kv_heads=4, intermediate_dim=1536, vocab_size=4096)


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def worker(base: str, out: str) -> None:
    import torch

    from torchft.checkpoint import load_hf_checkpoint
    from torchft.models import from_hf_config
    from torchft.modules.loss import ChunkedCrossEntropy
    from torchft.training.distributed import init_distributed, load_sharded_weights, local_bytes, shard_model
    from torchft.training.distributed_steps import sharded_forward_backward
    from torchft.training.optim import build_adamw

    env = init_distributed("cpu")
    with torch.device("meta"):
        model = from_hf_config(base)
    shard_model(model, env.mesh)
    # Lazy imports of the first backward / AdamW step (hundreds of MB of Python modules) happen here,
    # on a 2x2 layer, so that what is measured below is the model's.
    warm = torch.nn.Linear(2, 2)
    warm(torch.ones(1, 2)).sum().backward()
    build_adamw(warm.parameters(), lr=1e-5).step()
    start = anonymous_bytes()
    load_sharded_weights(model, load_hf_checkpoint(base), env.device, torch.float32)
    loaded = anonymous_bytes() - start
    optimizer = build_adamw(model.parameters(), lr=1e-5)
    loss_fn = ChunkedCrossEntropy(num_chunks=4)
    generator = torch.Generator().manual_seed(env.rank)
    for _ in range(2):
        tokens = torch.randint(0, SHAPE["vocab_size"], (max(1, 4 // env.world_size), 128), generator=generator)
        sharded_forward_backward(model, [{"tokens": tokens, "labels": tokens}], loss_fn)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trained = anonymous_bytes() - start
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    adam = sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    result = {"rank": env.rank, "weights": local_bytes(model), "adam": adam, "after_load": loaded,
              "after_steps": trained}
    Path(out, f"rank_{env.rank}.json").write_text(json.dumps(result))


def main() -> None:
    from torchft.training.quickstart import tiny_base_model

    gib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_base_model(str(Path(tmp) / "base"), **SHAPE, max_seq_len=512)
        rows = []
        for world in (1, 2, 4):
            out = Path(tmp) / f"w{world}"
            out.mkdir()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={world}", __file__, base, str(out)], check=True)
            ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]
            rows.append([max(r[k] for r in ranks) for k in ("weights", "adam", "after_load", "after_steps")])
        print("| world size | weights per rank | AdamW state per rank | anon. memory growth after load | "
              "after 2 AdamW steps |")
        print("|---|---|---|---|---|")
        for world, (weights, adam, loaded, trained) in zip((1, 2, 4), rows):
            print(f"| {world} | {weights / gib:.1f} MiB | {adam / gib:.1f} MiB | {loaded / gib:.1f} MiB | "
                  f"{trained / gib:.0f} MiB |")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker(*sys.argv[1:3])
    else:
        main()
