"""LoRA/DoRA over an int8 (per-channel, weight-only) frozen base: ``quantize_base="int8"``."""
import pytest
import torch
import torch.nn.functional as F

from torchft.modules.peft import DoRALinear, FrozenLinear, LoRALinear, weight_bytes
from torchft.modules.peft._int8 import INT8_QMAX


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_int8_base_forward_is_the_dequantized_weight_forward_and_equals_the_base_at_init(cls):
    torch.manual_seed(0)
    original = torch.randn(48, 64)  # [out, in]
    layer = cls(64, 48, rank=4, alpha=8, quantize_base="int8")
    layer.load_state_dict({"weight": original}, strict=False)
    if isinstance(layer, DoRALinear):
        layer.initialize_dora_magnitude()
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (48,)
    x = torch.randn(3, 5, 64)
    dequantized = layer.dequantized_weight()  # [out, in]
    # int8 rounding: at most half a step (scale = row absmax / 127) per weight
    step = original.abs().amax(dim=1, keepdim=True) / INT8_QMAX
    assert ((dequantized - original).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(layer.base_forward(x), F.linear(x, dequantized), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized), rtol=1e-5, atol=1e-5)  # B = 0: the base
    assert layer.state_dict()["weight"].dtype == torch.float32  # exports plain weights under the plain name


def test_int8_base_gradients_reach_the_adapters_only():
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, rank=4, alpha=8, quantize_base="int8")
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_a.weight.grad is not None and layer.lora_b.weight.grad is not None
    assert not layer.weight.requires_grad and layer.weight.grad is None
    # the input gradient goes through the dequantized base
    reference = x.detach().clone().requires_grad_(True)
    out = F.linear(reference, layer.dequantized_weight()) + layer.scaling * layer.lora_b(layer.lora_a(reference))
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-4)


def test_bytes_per_base_parameter_int8_against_nf4_and_bf16():
    """CPU accounting of a Llama-3 8B attention projection (4096 x 4096), built on meta."""
    with torch.device("meta"):
        layers = {fmt: FrozenLinear(4096, 4096, quantize_base=fmt) for fmt in ("int8", "nf4")}
        layers["bf16"] = FrozenLinear(4096, 4096).to(torch.bfloat16)
    per_param = {fmt: weight_bytes(layer) / 4096**2 for fmt, layer in layers.items()}
    assert per_param["bf16"] == 2.0
    assert per_param["int8"] == 1 + 4 / 4096  # int8 data + one fp32 scale per row
    assert per_param["nf4"] < 0.52
    # the figures docs/lora.md quotes
    assert f"{per_param['int8']:.4f}" == "1.0010" and f"{per_param['nf4']:.4f}" == "0.5159"


def test_builders_take_int8_and_refuse_an_unknown_base_format():
    from torchft.models import llama
    from torchft.models.llama3_2 import qlora_llama3_2_1b

    with torch.device("meta"):
        model = qlora_llama3_2_1b(quantize_base="int8")
        assert {m.base_format for m in model.modules() if isinstance(m, FrozenLinear)} == {"int8"}
        assert {m.base_format for m in qlora_llama3_2_1b().modules() if isinstance(m, FrozenLinear)} == {"nf4"}
    dims = dict(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64,
                max_seq_len=16)
    with pytest.raises(ValueError, match=r"quantize_base must be false, true \(nf4\), 'nf4' or 'int8', got 'fp8'"):
        llama(**dims, lora_attn_modules=["q_proj"], quantize_base="fp8")
