"""Post-training quantization vs quantization-aware training, after the same fine-tuning steps.

A small Llama (bench_quantize_ppl.py's model and data: the quickstart tokenizer, the repo's docs/*.md)
is pretrained, then fine-tuned twice from the same weights on the same batches: once plain, once with
QAT (``8da4w``, torchft.training.qat). Held-out perplexity of:

* baseline: the plain fine-tuned model in fp32;
* PTQ: that model quantized with ``int8_dynamic_activation_int4_weight`` (what ``tune run quantize`` does);
* QAT: the QAT fine-tuned model's plain weights (its step folder), quantized the same way; its
  fake-quantized forward is measured too and must give the same perplexity.

``lm_head`` stays unquantized in both (QAT's default). QAT is better when its perplexity is closer to
the baseline than PTQ's.

    python benchmarks/bench_qat_ppl.py            # CPU: a few minutes
    python benchmarks/bench_qat_ppl.py --tiny     # CPU, seconds: the test's mode (a smoke run)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize_ppl import docs_token_ids, small_llama, train_on  # noqa: E402

from torchft.data.tokenizers import quickstart_tokenizer  # noqa: E402
from torchft.eval import perplexity  # noqa: E402
from torchft.generation import quantize_model  # noqa: E402
from torchft.training.qat import CONVERT_SCHEMES, QATSettings, apply_qat  # noqa: E402

TINY = dict(dims=dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128),
            pretrain_steps=150, finetune_steps=40, seq_len=64, batch_size=8)
FULL = dict(dims={}, pretrain_steps=400, finetune_steps=150, seq_len=128, batch_size=8)


def measure(*, tiny: bool, device: str = "cpu", group_size: int = 32) -> dict[str, float]:
    """Held-out perplexities: ``baseline``, ``ptq``, ``qat`` (converted) and ``qat_fake_quant``."""
    shape = TINY if tiny else FULL
    torch.manual_seed(0)
    tokenizer = quickstart_tokenizer()
    train, held_out = docs_token_ids(tokenizer)
    held_out = held_out.tolist()
    batches = dict(seq_len=shape["seq_len"], batch_size=shape["batch_size"], device=device)
    base = small_llama(tokenizer.vocab_size, **shape["dims"]).to(device)
    train_on(base, train, steps=shape["pretrain_steps"], lr=2e-3, seed=0, **batches)

    settings = QATSettings("8da4w", group_size=group_size)
    plain, qat = copy.deepcopy(base), apply_qat(copy.deepcopy(base), settings)
    for model in (plain, qat):  # the same batches (seed 1) and learning rate
        train_on(model, train, steps=shape["finetune_steps"], lr=5e-4, seed=1, **batches)
        model.eval().requires_grad_(False)

    def quantized(state_dict):
        model = small_llama(tokenizer.vocab_size, **shape["dims"]).to(device)
        model.load_state_dict(state_dict)  # what a step folder holds: plain weights under plain names
        return quantize_model(model.eval(), CONVERT_SCHEMES[settings.scheme], group_size=group_size,
                              include_lm_head=False)

    return dict(baseline=perplexity(plain, held_out, window=256),
                ptq=perplexity(quantized(plain.state_dict()), held_out, window=256),
                qat=perplexity(quantized(qat.state_dict()), held_out, window=256),
                qat_fake_quant=perplexity(qat, held_out, window=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer dim-64 model, few steps")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (small models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ppl = measure(tiny=args.tiny, device=args.device)
    print(f"\n{time.perf_counter() - start:.0f} s; device {args.device}, torch {torch.__version__}")
    print("| model | held-out perplexity | vs baseline |\n|---|---|---|")
    for name in ("baseline", "ptq", "qat", "qat_fake_quant"):
        print(f"| {name} | {ppl[name]:.4f} | {100 * (ppl[name] / ppl['baseline'] - 1):+.3f}% |")


if __name__ == "__main__":
    main()
