"""Perplexity cost of each quantization scheme on a small trained model.

Random weights say little about quantization error, so this trains a small Llama (quickstart
tokenizer, a few hundred AdamW steps on the repo's docs/*.md) on CPU, then measures held-out
perplexity in fp32 and after each scheme this device runs (``torchft.generation.quantize_model``).

    python benchmarks/bench_quantize_ppl.py                 # CPU: about 2-4 minutes
    python benchmarks/bench_quantize_ppl.py --device cuda   # adds int4_weight_only (bf16)
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchft.data.tokenizers import quickstart_tokenizer
from torchft.eval import perplexity
from torchft.generation import SCHEMES, quantize_model, stored_bytes
from torchft.models import llama

ROOT = Path(__file__).resolve().parents[1]


def docs_token_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The repo's docs/*.md as token ids, split 90% train / 10% held out."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = torch.tensor(tokenizer.encode(text, add_bos=True, add_eos=False))
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:]


def small_llama(vocab_size: int, **dims):
    """4 layers, hidden 256 (3.7M parameters with the quickstart vocabulary) unless ``dims`` says otherwise."""
    shape = dict(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768, max_seq_len=512)
    return llama(vocab_size=vocab_size, **{**shape, **dims})


def train_on(model, train: torch.Tensor, *, steps: int, seq_len: int, batch_size: int, lr: float, seed: int,
             device: str, cosine: bool = False) -> float:
    """``steps`` AdamW steps on random windows of ``train`` (the windows drawn from ``seed``); the last loss.
    ``cosine``: the learning rate decays from ``lr`` to 0 along a half cosine (else it stays ``lr``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if cosine:
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        offsets = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([train[o : o + seq_len + 1] for o in offsets.tolist()]).to(device)  # [b, s + 1]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = quickstart_tokenizer()
    train, held_out = docs_token_ids(tokenizer)
    model = small_llama(tokenizer.vocab_size).to(args.device)
    start = time.perf_counter()
    train_on(model, train, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=2e-3, seed=0,
             device=args.device)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; "
          f"{len(train)} train / {len(held_out)} held-out tokens")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    device_type = torch.device(args.device).type
    base_ppl = perplexity(model, held_out.tolist(), window=256)
    rows = [("none (fp32)", base_ppl, stored_bytes(model))]
    for scheme, devices in SCHEMES.items():
        if device_type not in devices:
            rows.append((scheme, None, None))
            continue
        q = copy.deepcopy(model)
        if scheme == "int4_weight_only":
            q = q.to(torch.bfloat16)
        quantize_model(q, scheme, group_size=32)
        rows.append((scheme, perplexity(q, held_out.tolist(), window=256), stored_bytes(q)))

    print(f"\ndevice {args.device}, torch {torch.__version__}; held-out perplexity ({len(held_out)} tokens)")
    print("| scheme | perplexity | change | weight MiB |\n|---|---|---|---|")
    for scheme, ppl, size in rows:
        if ppl is None:
            print(f"| {scheme} | needs {'/'.join(SCHEMES[scheme]).upper()} | | |")
        else:
            print(f"| {scheme} | {ppl:.4f} | {100 * (ppl / base_ppl - 1):+.2f}% | {size / 2**20:.2f} |")


if __name__ == "__main__":
    main()
