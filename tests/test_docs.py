"""Every ```python block in docs/ and README.md runs, and the figures the pages quote are recomputed.

The blocks of one page run in order in one fresh interpreter (a page can build on its earlier
blocks), inside a temporary working directory. Blocks that need things this machine cannot have
(a GPU, a downloaded model) are written as ```text or ```bash instead.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _pages_with_code():
    return [p for p in PAGES if p.exists() and BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path):
    code = "\n\n".join(BLOCK.findall(page.read_text()))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page.name} examples failed:\n{result.stderr[-3000:]}"


# Figures the pages quote, each recomputed here: (page, the exact text quoted) -> the computation.
def _page(name):
    return (ROOT / name).read_text()


def _adapter_and_all(builder, **kwargs):
    import torch

    with torch.device("meta"):
        model = builder(**kwargs)
    params = list(model.named_parameters())
    return sum(p.numel() for n, p in params if ".lora_" in n), params  # adapters: lora_a, lora_b


def test_lora_adapter_size_of_8b_q_v_rank_8():
    from torchft.models.llama3_1 import lora_llama3_1_8b

    trainable, _ = _adapter_and_all(lora_llama3_1_8b, lora_attn_modules=["q_proj", "v_proj"], lora_rank=8)
    # fp32 adapter weights + AdamW's two fp32 moments: 12 bytes per parameter
    quoted = f"{trainable / 1e6:.1f}M parameters ({12 * trainable / 1e6:.0f} MB with AdamW)"
    assert quoted == "3.4M parameters (41 MB with AdamW)"
    assert quoted in _page("docs/lora.md")


def test_nf4_relative_error_on_gaussian_weights():
    import torch
    from torchao.quantization import to_nf4

    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    error = (to_nf4(weight).to(torch.float32) - weight).norm() / weight.norm()
    assert abs(error.item() - 0.092) < 0.0015  # the page says "about 0.092"
    assert "relative Frobenius error of about 0.092" in _page("docs/lora.md")


def test_qlora_8b_weights_and_nf4_bytes_per_parameter():
    import torch
    from torchao.quantization import to_nf4

    from torchft.models.llama3_1 import llama3_1_8b

    nf4 = to_nf4(torch.randn(4096, 4096, dtype=torch.bfloat16))
    inner, _ = nf4.__tensor_flatten__()
    nf4_bytes_per_param = sum(getattr(nf4, n).numel() * getattr(nf4, n).element_size() for n in inner) / nf4.numel()
    _, params = _adapter_and_all(llama3_1_8b)
    # NF4: the decoder layers' linear weights; bf16: embeddings, output, norms
    quantized = sum(p.numel() for n, p in params if "layers." in n and n.endswith("proj.weight"))
    total_bytes = quantized * nf4_bytes_per_param + (sum(p.numel() for _, p in params) - quantized) * 2
    assert f"about {nf4_bytes_per_param:.2f} bytes per parameter" == "about 0.52 bytes per parameter"
    assert f"{total_bytes / 1e9:.1f} GB" == "5.7 GB"
    text = " ".join(_page("docs/finetuning.md").split())
    assert "stored as NF4 (about 0.52 bytes per parameter)" in text and "weights take about 5.7 GB" in text


def test_activation_per_layer_figures_follow_the_per_token_table():
    text = " ".join(_page("docs/finetuning.md").split())
    per_token_kib = float(re.search(r"\| Llama-3.2-1B \(dim 2048, MLP 8192\), eager \| \*\*([\d.]+) KiB", text)[1])
    per_layer_gib = 4 * 2048 * per_token_kib / 2**20
    quoted = f"4 x 2048 tokens keep about {per_layer_gib:.2f} GiB per layer without checkpointing ({16 * per_layer_gib:.1f} GiB for 16 layers)"
    assert quoted in text


def test_packed_quickstart_dataset_figures():
    from torchft.data import quickstart_dataset, quickstart_tokenizer

    packed = quickstart_dataset(quickstart_tokenizer(), max_seq_len=256, packed=True)
    assert 380 <= len(packed) <= 420 and 0.93 <= packed.stats["pack_fill"] <= 0.97  # "~400 packs, ~95% full"
    assert "4000 samples in ~400 packs, ~95% full" in _page("docs/data.md")


def test_distributed_sharded_bytes_table_and_8b_full_finetuning_bytes():
    from torchft.models.llama3_1 import llama3_1_8b, llama3_1_70b
    from torchft.models.llama3_2 import llama3_2_1b

    rows = {"Llama 3.2 1B, 2 GPUs": (llama3_2_1b, 2), "Llama 3.1 8B, 8 GPUs": (llama3_1_8b, 8),
            "Llama 3.1 70B, 8 GPUs": (llama3_1_70b, 8)}
    text = _page("docs/distributed.md")
    for row, (builder, gpus) in rows.items():
        _, params = _adapter_and_all(builder)
        n = sum(p.numel() for _, p in params)
        cells = re.search(rf"^\| {re.escape(row)} \| ([\d.]+) GB.*?\| ([\d.]+) GB \| ([\d.]+) GB \|$", text, re.M)
        assert cells, row
        # full: 8 bytes/param; LoRA: the bf16 base, 2; QLoRA: about 0.52 (NF4, see the test above)
        assert [float(c) for c in cells.groups()] == [round(n * b / gpus / 1e9, 1) for b in (8, 2, 0.52)], row
        if builder is llama3_1_8b:
            assert f"an 8B model: {n * 8 / 1e9:.0f} GB before activations" in " ".join(_page("docs/finetuning.md").split())
