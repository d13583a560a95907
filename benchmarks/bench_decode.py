"""Batch-1 greedy decode speed: torchft's ``generate`` vs transformers' ``generate`` on the same weights.

Both get the same random-weight Llama, the same prompt and the same number of new tokens (no early
stop). Decode speed excludes the prefill: (N - 1) / (time for N new tokens - time for 1 new token),
median of ``--repeats`` runs each. The greedy token ids of both are compared and reported.

    python benchmarks/bench_decode.py                       # CPU, tiny shape (minutes)
    python benchmarks/bench_decode.py --shape 1b --device cuda --dtype bf16 --compile
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=8192),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchft.models import from_hf_config

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        hf_model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.device("meta"):
        model = from_hf_config(config.to_dict())
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, assign=True, strict=True)
    return hf_model, model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# HBM bandwidth (bytes/s) of the GPUs the suite is run on: decode's upper bound is bandwidth / weight bytes.
MEMORY_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def bandwidth_limit_tokens_per_s(model: torch.nn.Module, device: str) -> float | None:
    """Batch-1 decode can read every weight once per token at best: bandwidth / weight bytes."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    bandwidth = next((v for k, v in MEMORY_BANDWIDTH.items() if k in name), None)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return bandwidth / weight_bytes if bandwidth else None


def measure(shape: str, device: str, dtype: torch.dtype, prompt_len: int = 128, new_tokens: int = 256,
            repeats: int = 3, compile: bool = False) -> dict:
    """Decode tokens/s of transformers' generate and torchft's (eager, and compiled when asked) on the
    same weights: ``{"rows": [(decoder, tokens/s, peak GiB or None)], "same_tokens": bool,
    "bandwidth_limit": tokens/s or None}``."""
    from torchft.generation import generate

    hf_model, model = build(shape, device, dtype)
    vocab = SHAPES[shape]["vocab_size"]
    prompt = torch.randint(1, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()[0]
    hf_input = torch.tensor([prompt], device=device)
    n = new_tokens

    def hf_run(k):
        return hf_model.generate(hf_input, attention_mask=torch.ones_like(hf_input), max_new_tokens=k,
                                 min_new_tokens=k, do_sample=False, pad_token_id=0, eos_token_id=None)

    runs = {
        "transformers generate (dynamic cache)": lambda k: hf_run(k)[0, len(prompt):].tolist(),
        "torchft generate (eager)": lambda k: generate(model, prompt, k),
    }
    if compile:
        runs["torchft generate (compiled decode step)"] = lambda k: generate(model, prompt, k, compile=True)

    outputs, rows = {}, []
    with torch.no_grad():
        for name, run in runs.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            outputs[name] = run(n)  # warm-up (and compilation), twice: the first compiled calls are slower
            run(n)
            run(1)
            speeds = []
            for _ in range(repeats):
                t_full = timed(lambda: run(n), device)
                t_one = timed(lambda: run(1), device)
                speeds.append((n - 1) / max(t_full - t_one, 1e-9))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            rows.append((name, statistics.median(speeds), peak))
            print(f"{name}: {statistics.median(speeds):.1f} tokens/s (runs: {', '.join(f'{s:.1f}' for s in speeds)})"
                  + (f", peak {peak:.2f} GiB" if peak is not None else ""), flush=True)
    names = list(outputs)
    same = all(outputs[x] == outputs[names[0]] for x in names)
    return dict(rows=rows, same_tokens=same, bandwidth_limit=bandwidth_limit_tokens_per_s(model, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torchft with the compiled decode step")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    result = measure(args.shape, args.device, dtype, args.prompt_len, args.new_tokens, args.repeats, args.compile)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nshape {args.shape}, {args.dtype}, {device_name}, torch {torch.__version__}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, threads {torch.get_num_threads()}")
    print("| decoder | tokens/s |\n|---|---|")
    for name, speed, _ in result["rows"]:
        print(f"| {name} | {speed:.1f} |")
    print(f"greedy token ids identical across decoders: {result['same_tokens']}")
    if args.json:
        print(json.dumps(dict(result, shape=args.shape)))


if __name__ == "__main__":
    main()
