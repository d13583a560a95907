"""Times building every preset on the meta device (no memory is allocated for weights).

Usage: python benchmarks/build_meta.py
Prints one line per preset: parameter count and build time. Target: under a second each, 405B included.
"""
import time

import torch

from torchft.models import llama2, llama3, llama3_1, llama3_2

PRESETS = [llama2.llama2_7b, llama2.llama2_13b, llama2.llama2_70b, llama3.llama3_8b, llama3.llama3_70b,
           llama3_1.llama3_1_8b, llama3_1.llama3_1_70b, llama3_1.llama3_1_405b, llama3_2.llama3_2_1b,
           llama3_2.llama3_2_3b]


def main() -> None:
    with torch.device("meta"):
        llama3_2.llama3_2_1b()  # warm-up: first-call import and dispatch costs are not the builder's
    for builder in PRESETS:
        start = time.perf_counter()
        with torch.device("meta"):
            model = builder()
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        print(f"{builder.__name__:16s} {params / 1e9:8.2f}B params  built on meta in {seconds * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
