"""Post-training quantization (PTQ) vs quantization-aware training (QAT), after the same fine-tuning steps.

A small Llama (bench_quantize_ppl.py's model family, the quickstart tokenizer, the repo's docs/*.md as
text) is pretrained to convergence (AdamW, learning rate 1e-2 decaying along a cosine), then fine-tuned
from those same weights on the same batches twice: once plain, once with QAT (torchft.training.qat,
``8da4w``, ``include_lm_head``). The token ids are cut into: one tenth held out (the last or the first
tenth, ``held_out``), and of the rest the first 70% for pretraining and the last 30% for fine-tuning, so
fine-tuning sees text the pretraining did not and perplexity is measured on text neither saw.

Held-out perplexity of:

* ``baseline``: the plain fine-tuned model in fp32;
* ``ptq``: that model quantized with ``int8_dynamic_activation_int4_weight`` (what ``tune run quantize``
  does with ``quantize_lm_head=true``);
* ``qat``: the QAT fine-tuned model's plain weights (what its step folder holds), quantized the same way;
* ``qat_fake_quant``: the QAT model's fake-quantized forward, which the conversion must reproduce.

Every linear is quantized, ``lm_head`` included (a third of this model's weights), int4 in groups of 32:
on a model this small, decoder linears alone cost under 1% perplexity, about what two fine-tuning runs
differ by anyway. QAT is better when its perplexity is closer to the baseline than PTQ's.

    python benchmarks/bench_qat_ppl.py --tiny                         # CPU: the test's run, ~20 s
    python benchmarks/bench_qat_ppl.py --tiny --seeds 0 1 2 --held-out last first   # 6 runs
    python benchmarks/bench_qat_ppl.py                                # 4 layers, dim 256: minutes
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

TINY = dict(dims=dict(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=64),
            pretrain_steps=600, pretrain_lr=1e-2, finetune_steps=100, finetune_lr=1e-3, seq_len=64, batch_size=8)
FULL = dict(dims=dict(num_layers=4, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128),
            pretrain_steps=800, pretrain_lr=1e-2, finetune_steps=150, finetune_lr=5e-4, seq_len=128, batch_size=8)
QAT = QATSettings("8da4w", group_size=32, include_lm_head=True)


def split_tokens(tokenizer, held_out: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(pretrain, finetune, held_out)`` token ids; ``held_out`` is ``"last"`` or ``"first"`` (tenth)."""
    train, tail = docs_token_ids(tokenizer)  # 90% / 10%
    if held_out == "first":
        ids = torch.cat([train, tail])
        tail, train = ids[: len(tail)], ids[len(tail):]
    elif held_out != "last":
        raise ValueError(f"held_out must be 'last' or 'first', got {held_out!r}")
    cut = int(0.7 * len(train))
    return train[:cut], train[cut:], tail.tolist()


def measure(*, tiny: bool, seed: int = 0, held_out: str = "last", device: str = "cpu") -> dict[str, float]:
    """Held-out perplexities ``baseline``, ``ptq``, ``qat`` (converted), ``qat_fake_quant`` and ``pretrained``
    (the common starting point). ``seed`` draws the initial weights and every batch."""
    shape = TINY if tiny else FULL
    torch.manual_seed(seed)
    tokenizer = quickstart_tokenizer()
    pretrain, finetune, held_out_ids = split_tokens(tokenizer, held_out)
    batches = dict(seq_len=shape["seq_len"], batch_size=shape["batch_size"], device=device)
    base = small_llama(tokenizer.vocab_size, **shape["dims"]).to(device)
    train_on(base, pretrain, steps=shape["pretrain_steps"], lr=shape["pretrain_lr"], seed=seed, cosine=True,
             **batches)

    plain, qat = copy.deepcopy(base), apply_qat(copy.deepcopy(base), QAT)
    for model in (plain, qat):  # the same batches, in the same order, and the same learning rate
        train_on(model, finetune, steps=shape["finetune_steps"], lr=shape["finetune_lr"], seed=seed + 1000,
                 **batches)
        model.eval().requires_grad_(False)

    def quantized(state_dict):
        model = small_llama(tokenizer.vocab_size, **shape["dims"]).to(device)
        model.load_state_dict(state_dict)  # what a step folder holds: plain weights under plain names
        return quantize_model(model.eval(), CONVERT_SCHEMES[QAT.scheme], group_size=QAT.group_size,
                              include_lm_head=QAT.include_lm_head)

    def ppl(model):
        return perplexity(model, held_out_ids, window=256)

    return dict(pretrained=ppl(base), baseline=ppl(plain), ptq=ppl(quantized(plain.state_dict())),
                qat=ppl(quantized(qat.state_dict())), qat_fake_quant=ppl(qat))


def cost(ppl: dict[str, float], name: str) -> float:
    """Perplexity of ``name`` over the baseline's, in percent."""
    return 100 * (ppl[name] / ppl["baseline"] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="2 layers, dim 32, 600 + 100 steps of 8 x 64 tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--held-out", nargs="+", default=["last"], choices=["last", "first"])
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (small models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for held_out in args.held_out:
        for seed in args.seeds:
            start = time.perf_counter()
            ppl = measure(tiny=args.tiny, seed=seed, held_out=held_out, device=args.device)
            rows.append((held_out, seed, ppl, time.perf_counter() - start))
    print(f"\ndevice {args.device}, torch {torch.__version__}; QAT {QAT}")
    print("| held out | seed | pretrained | baseline | PTQ | QAT | QAT fake-quant | PTQ cost | QAT cost | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for held_out, seed, ppl, seconds in rows:
        print(f"| {held_out} | {seed} | {ppl['pretrained']:.3f} | {ppl['baseline']:.3f} | {ppl['ptq']:.3f} | "
              f"{ppl['qat']:.3f} | {ppl['qat_fake_quant']:.3f} | {cost(ppl, 'ptq'):+.2f}% | "
              f"{cost(ppl, 'qat'):+.2f}% | {seconds:.0f} |")


if __name__ == "__main__":
    main()
