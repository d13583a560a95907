"""Batch-1 greedy decode speed: torchft's ``generate`` vs transformers' ``generate`` on the same weights.

Both get the same random-weight Llama, the same prompt and the same number of new tokens (no early
stop). Decode speed excludes the prefill: (N - 1) / (time for N new tokens - time for 1 new token),
median of ``--repeats`` runs each. The greedy token ids of both are compared and reported.

    python benchmarks/bench_decode.py                       # CPU, tiny shape (minutes)
    python benchmarks/bench_decode.py --shape 1b --device cuda --dtype bf16 --compile
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torchft with the compiled decode step")
    args = parser.parse_args()

    from torchft.generation import generate

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    hf_model, model = build(args.shape, args.device, dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompt = torch.randint(1, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).tolist()[0]
    hf_input = torch.tensor([prompt], device=args.device)
    n = args.new_tokens

    def hf_run(k):
        return hf_model.generate(hf_input, attention_mask=torch.ones_like(hf_input), max_new_tokens=k,
                                 min_new_tokens=k, do_sample=False, pad_token_id=0, eos_token_id=None)

    runs = {
        "transformers generate (dynamic cache)": lambda k: hf_run(k)[0, len(prompt):].tolist(),
        "torchft generate (eager)": lambda k: generate(model, prompt, k),
    }
    if args.compile:
        runs["torchft generate (compiled decode step)"] = lambda k: generate(model, prompt, k, compile=True)

    outputs, rows = {}, []
    with torch.no_grad():
        for name, run in runs.items():
            outputs[name] = run(n)  # warm-up (and compilation), twice: the first compiled calls are slower
            run(n)
            run(1)
            speeds = []
            for _ in range(args.repeats):
                t_full = timed(lambda: run(n), args.device)
                t_one = timed(lambda: run(1), args.device)
                speeds.append((n - 1) / (t_full - t_one))
            rows.append((name, statistics.median(speeds)))
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            print(f"{name}: {statistics.median(speeds):.1f} tokens/s (runs: {', '.join(f'{s:.1f}' for s in speeds)})"
                  + (f", peak {peak:.2f} GiB" if peak == peak else ""), flush=True)

    names = list(outputs)
    same = all(outputs[x] == outputs[names[0]] for x in names)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nshape {args.shape}, {args.dtype}, {device_name}, torch {torch.__version__}, "
          f"prompt {args.prompt_len}, new tokens {n}, threads {torch.get_num_threads()}")
    print("| decoder | tokens/s |\n|---|---|")
    for name, speed in rows:
        print(f"| {name} | {speed:.1f} |")
    print(f"greedy token ids identical across decoders: {same}")


if __name__ == "__main__":
    main()
