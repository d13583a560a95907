"""Tokenize + pack throughput of torchft's data pipeline next to raw tiktoken, in the same run.

    python benchmarks/bench_data.py               # ~100 MB generated corpus
    python benchmarks/bench_data.py --size-mb 10  # smaller

A corpus of documents is generated (Zipf-distributed made-up words, sentences, paragraphs), a
Llama-3-format BPE of ``--merges`` merges is trained on a slice of it, and then, with the same ranks file:

- raw: ``tiktoken.Encoding.encode_ordinary_batch`` over the documents (in batches of 1024, ``--threads``)
- torchft: ``text_completion_dataset(tokenizer, rows, max_seq_len=2048, packed=True)`` on the same rows
  (a ``datasets.Dataset`` in memory): tokenization, BOS/EOS, length policy, the memory-mapped token store
  and the pack index; plus the first pass over every pack
- torchft end to end: the same from a JSONL file on disk (validation, ``datasets`` parsing included)

Raw and torchft runs alternate ``--repeats`` times and the best of each is reported. Throughput is reported in MB of text per second.
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

import numpy as np


def make_corpus(size_mb: float, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed made-up words with sentences, numbers and paragraphs (deterministic)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "an", "el", "or", "ith", "ung", "ber", "st", "qu",
                 "ph", "ee", "ou", "ai", "x", "z", "é", "ñ"]
    vocab = ["".join(rng.choice(syllables, size=n)) for n in rng.integers(1, 5, size=30_000)]
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.1)
    cdf /= cdf[-1]
    target = int(size_mb * 1e6)
    docs, total = [], 0
    while total < target:
        n = int(rng.integers(100, 800))
        words = [vocab[i] for i in np.searchsorted(cdf, rng.random(n))]
        # Sentence ends every 5-20 words, some with a number, some followed by a paragraph break.
        for end in np.cumsum(rng.integers(5, 20, size=n // 5)):
            if end >= n:
                break
            words[end - 1] += rng.choice([".", ".", "!", "?", f" {int(rng.integers(0, 10000))}.", ".\n\n"])
            words[end] = words[end].capitalize()
        doc = " ".join(words).replace("\n\n ", "\n\n") + "."
        docs.append(doc[0].upper() + doc[1:])
        total += len(doc.encode())
    return docs


MEMORY_PROBE = r"""
import sys, threading, time
import datasets
from torchft.data import llama3_tokenizer, text_completion_dataset

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

datasets.disable_progress_bars()
tokenizer = llama3_tokenizer(sys.argv[1])
base, peak, done = rss("RssAnon"), [0], False

def sample():  # anonymous (not file-backed) memory, sampled every 20 ms
    while not done:
        peak[0] = max(peak[0], rss("RssAnon"))
        time.sleep(0.02)

thread = threading.Thread(target=sample)
thread.start()
ds = text_completion_dataset(tokenizer, "json", sys.argv[2], max_seq_len=int(sys.argv[3]), packed=True, cache_dir=sys.argv[4])
for i in range(len(ds)):
    ds[i]
done = True
thread.join()
print(base, peak[0], ds.stats["tokens"])
"""


def measure_memory(ranks_path, jsonl, max_seq_len, workdir):
    """Anonymous RSS of a fresh process building the packed dataset from the JSONL file (end to end)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, ranks_path, jsonl, str(max_seq_len), workdir],
                         capture_output=True, text=True, check=True).stdout.split()
    base, peak, tokens = map(int, out[-3:])
    return base, peak, tokens


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--merges", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()

    import datasets
    import tiktoken
    import torch

    from torchft.data import llama3_tokenizer, text_completion_dataset
    from torchft.data.tokenizers.bpe import train_llama3_ranks
    from torchft.data.tokenizers.llama3 import LLAMA3_PATTERN, load_ranks

    datasets.disable_progress_bars()
    workdir = tempfile.mkdtemp(prefix="bench-data-")
    t0 = time.perf_counter()
    docs = make_corpus(args.size_mb)
    size_mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {size_mb:.1f} MB (generated in {time.perf_counter() - t0:.1f} s)")

    ranks_path = os.path.join(workdir, "tokenizer.model")
    t0 = time.perf_counter()
    train_llama3_ranks(docs[: max(1, len(docs) // 50)], num_merges=args.merges, path=ranks_path)
    tokenizer = llama3_tokenizer(ranks_path)
    print(f"tokenizer: {tokenizer.num_base_tokens} ranks + 256 special (trained in {time.perf_counter() - t0:.1f} s)")

    raw = tiktoken.Encoding("raw", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_ranks(ranks_path), special_tokens={})

    def run_raw():
        count = 0
        for start in range(0, len(docs), 1024):
            count += sum(map(len, raw.encode_ordinary_batch(docs[start : start + 1024], num_threads=args.threads)))
        return count

    rows = datasets.Dataset.from_dict({"text": docs})

    def run_torchft(source, data_files=None):
        ds = text_completion_dataset(tokenizer, source, data_files, max_seq_len=args.max_seq_len, packed=True,
                                     long_samples="truncate", cache_dir=workdir)
        return ds

    # Interleaved, best of each: load from other processes hits both sides alike.
    raw_times, ours_times = [], []
    for _ in range(args.repeats):
        seconds, raw_tokens = best_of(1, run_raw)
        raw_times.append(seconds)
        seconds, packed = best_of(1, lambda: run_torchft(rows))
        ours_times.append(seconds)
    raw_s, ours_s = min(raw_times), min(ours_times)
    t0 = time.perf_counter()
    for i in range(len(packed)):
        packed[i]
    read_s = time.perf_counter() - t0

    jsonl = os.path.join(workdir, "corpus.jsonl")
    with open(jsonl, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    e2e_s, _ = best_of(1, lambda: run_torchft("json", jsonl))
    base, peak, tokens = measure_memory(ranks_path, jsonl, args.max_seq_len, workdir)

    stats = packed.stats
    # Same token count as raw + BOS/EOS per document (minus what truncation removed).
    print(f"raw tiktoken tokens: {raw_tokens}; torchft tokens: {stats['tokens']} "
          f"({stats['truncated']} docs truncated to {args.max_seq_len}); packs: {stats['packs']}, fill {stats['pack_fill']:.3f}")
    rows_out = [
        ("raw tiktoken encode_ordinary_batch", raw_s, 1.0),
        ("torchft tokenize + pack (text_completion_dataset, packed=True)", ours_s, raw_s / ours_s),
        ("torchft end to end from JSONL (validate + datasets + tokenize + pack)", e2e_s, raw_s / e2e_s),
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, tiktoken {tiktoken.__version__}, datasets {datasets.__version__}; commit {commit}")
    print(f"corpus {size_mb:.1f} MB, vocab {tokenizer.vocab_size}, threads {args.threads}, best of {args.repeats}\n")
    print("| pipeline | time | MB/s | x raw tiktoken |")
    print("|---|---|---|---|")
    for name, seconds, ratio in rows_out:
        print(f"| {name} | {seconds:.2f} s | {size_mb / seconds:.1f} | {ratio:.2f}x |")
    print(f"\nreading all {len(packed)} packs once: {read_s:.2f} s ({len(packed) / read_s:.0f} packs/s)")
    print(f"memory, fresh process, JSONL -> packed dataset -> every pack read once: anonymous RSS {base / 2**20:.0f} MiB "
          f"after imports, peak {peak / 2**20:.0f} MiB (+{(peak - base) / 2**20:.0f} MiB) for {size_mb:.0f} MB of text "
          f"and {tokens} tokens ({tokens * 4 / 2**20:.0f} MiB as int32, kept in memory-mapped files)")


if __name__ == "__main__":
    main()
