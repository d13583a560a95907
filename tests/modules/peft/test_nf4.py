"""QLoRA's NF4 base weights: torchao parity, error bound, bytes, load/save rules, forward/backward."""
import pytest
import torch
import torch.nn.functional as F

from torchft.modules.peft import (
    FrozenNF4Linear,
    LoRALinear,
    get_adapter_params,
    get_merged_state_dict,
    initialize_adapters,
    load_base_state_dict,
    set_trainable_params,
    weight_bytes,
)
from torchft.modules.peft._nf4 import is_nf4, tensor_bytes

torchao_nf4 = pytest.importorskip("torchao.quantization")

# Relative Frobenius error of NF4 on Gaussian weights (measured 0.092 for bf16, any std/shape),
# and the worst element error relative to its block's absmax (measured <= 0.158).
NF4_REL_FROBENIUS_BOUND = 0.10
NF4_BLOCK_ABSMAX_BOUND = 0.17
NF4_BYTES_PER_PARAM_BOUND = 0.52

# Tiny model whose every decoder linear satisfies NF4's size rule (numel % 16384 == 0).
NF4_TINY = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128, intermediate_dim=256,
                max_seq_len=32)


def _gaussian(shape, seed, dtype=torch.bfloat16, std=0.02):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)


def _nf4_parts(t):
    names, _ = t.__tensor_flatten__()
    return {name: getattr(t, name) for name in names}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantization_is_torchao_bit_for_bit(dtype):
    weight, bias = _gaussian((128, 256), 0, dtype), _gaussian((128,), 1, dtype)
    reference = torchao_nf4.to_nf4(weight, 64, 256)
    with torch.device("meta"):
        layer = LoRALinear(256, 128, 8, 16.0, use_bias=True, quantize_base=True)
    layer.load_state_dict({"weight": weight, "bias": bias}, strict=False, assign=True)
    assert is_nf4(layer.weight) and layer.weight.dtype == dtype
    for name, part in _nf4_parts(reference).items():
        assert torch.equal(_nf4_parts(layer.weight)[name], part), name
    # Dequantization (state_dict) and the forward use exactly torchao's dequantized weight.
    saved = layer.state_dict()["weight"]
    assert type(saved) is torch.Tensor and torch.equal(saved, reference.get_original_weight())
    initialize_adapters(layer)
    layer.lora_a.to(dtype)
    layer.lora_b.to(dtype)
    x = _gaussian((3, 256), 2, dtype, std=1.0)
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    expected = linear_nf4(x, reference) + bias
    assert torch.equal(layer(x), expected)
    assert torch.equal(expected, F.linear(x, reference.get_original_weight()) + bias)


def test_load_without_assign_quantizes_into_existing_layer():
    torch.manual_seed(0)
    layer = FrozenNF4Linear(256, 128)
    weight = _gaussian((128, 256), 3, torch.float32)
    layer.load_state_dict({"weight": weight})
    assert is_nf4(layer.weight) and not layer.weight.requires_grad
    assert torch.equal(layer.weight.get_original_weight(), torchao_nf4.to_nf4(weight, 64, 256).get_original_weight())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("std", [0.02, 1.0])
def test_nf4_error_against_bf16_is_bounded(seed, std):
    weight = _gaussian((256, 256), seed, std=std)
    with torch.device("meta"):
        layer = FrozenNF4Linear(256, 256)
    layer.load_state_dict({"weight": weight}, assign=True)
    error = layer.dequantized_weight().float() - weight.float()
    assert error.norm() / weight.float().norm() <= NF4_REL_FROBENIUS_BOUND
    block_absmax = weight.float().reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert (error.reshape(-1, 64).abs() / block_absmax).max() <= NF4_BLOCK_ABSMAX_BOUND


def test_nf4_bytes_per_parameter():
    with torch.device("meta"):
        meta_layer = FrozenNF4Linear(4096, 14336)  # a Llama-3 8B MLP projection, never allocated
    real_layer = FrozenNF4Linear(256, 256)
    for layer in (meta_layer, real_layer):
        per_param = weight_bytes(layer) / layer.weight.numel()
        assert per_param == tensor_bytes(layer.weight) / layer.weight.numel()
        assert 0.5 < per_param <= NF4_BYTES_PER_PARAM_BOUND


def test_layer_nf4_cannot_take_stays_plain_with_a_warning():
    with pytest.warns(UserWarning, match=r"LoRALinear\(in_dim=64, out_dim=32\): NF4 needs the element count to be "
                                         r"divisible by 16384 .* got 32x64 = 2048; this base weight stays in"):
        layer = LoRALinear(64, 32, 4, 8.0, quantize_base=True)
    assert not is_nf4(layer.weight) and not layer.quantize_base
    model = torch.nn.Module()
    model.k_proj = layer
    with pytest.warns(UserWarning, match=r"^k_proj: NF4 needs the element count to be divisible by 16384"):
        model.load_state_dict({"k_proj.weight": torch.zeros(32, 64)}, strict=False)
    assert not is_nf4(layer.weight)


def test_to_empty_then_load_without_assign():
    """The FSDP-style path: meta -> to_empty(device) -> load_state_dict (copy semantics)."""
    with torch.device("meta"):
        layer = LoRALinear(256, 128, 8, 16.0, quantize_base=True)
    layer.to_empty(device="cpu")
    weight = _gaussian((128, 256), 4, torch.float32)
    result = layer.load_state_dict({"weight": weight}, strict=False)
    assert result.missing_keys == ["lora_a.weight", "lora_b.weight"]
    assert is_nf4(layer.weight) and all(not t.is_meta for t in _nf4_parts(layer.weight).values())
    assert torch.equal(layer.dequantized_weight(), torchao_nf4.to_nf4(weight, 64, 256).get_original_weight())


def test_dtype_and_device_moves_keep_nf4():
    torch.manual_seed(0)
    layer = LoRALinear(256, 128, 8, 16.0, quantize_base=True)
    data = layer.weight.quantized_data.clone()
    layer.to("cpu")
    assert is_nf4(layer.weight) and torch.equal(layer.weight.quantized_data, data)
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert is_nf4(layer.weight) and layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
    assert layer.lora_a.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.dequantized_weight().float(), before, rtol=0.02, atol=1e-3)
    layer.float()
    assert is_nf4(layer.weight) and layer.weight.dtype == torch.float32


def _tiny_qlora(**kwargs):
    from torchft.models import llama

    return llama(**NF4_TINY, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, **kwargs)


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_model_forward_backward_on_cpu(use_dora):
    from torchft.models import llama

    torch.manual_seed(0)
    plain = llama(**NF4_TINY)
    base_state = plain.state_dict()
    with torch.device("meta"):
        model = _tiny_qlora(quantize_base=True, use_dora=use_dora)
    load_base_state_dict(model, base_state, assign=True)
    initialize_adapters(model, device="cpu")

    linears = [m for n, m in model.named_modules() if n.endswith("_proj") and "layers." in n]
    assert len(linears) == 14 and all(is_nf4(m.weight) for m in linears)
    assert not is_nf4(model.embed_tokens.weight) and not is_nf4(model.lm_head.weight)

    adapters = get_adapter_params(model)
    set_trainable_params(model, adapters)
    tokens = torch.randint(0, 64, (2, 8))
    logits = model(tokens)
    # At init the adapters are the identity: QLoRA = the plain model on dequantized weights.
    dequantized = llama(**NF4_TINY)
    dequantized.load_state_dict(get_merged_state_dict(model))
    torch.testing.assert_close(logits, dequantized(tokens))
    logits.logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapters)
    assert all(adapters[n].grad.abs().sum() > 0 for n in adapters if n.endswith("lora_b.weight"))


def test_qlora_state_dict_is_plain_and_loads_anywhere():
    torch.manual_seed(0)
    model = _tiny_qlora(quantize_base=True)
    state = model.state_dict()
    assert all(type(t) is torch.Tensor for t in state.values())
    lora = _tiny_qlora()  # same keys, no NF4
    assert set(state) == set(lora.state_dict())
    lora.load_state_dict(state)
    tokens = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(lora(tokens), model(tokens))


def test_qlora_llama3_1_8b_weight_bytes_on_meta():
    from torchft.models.llama3_1 import qlora_llama3_1_8b

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = qlora_llama3_1_8b(lora_attn_modules=["q_proj", "v_proj"], lora_rank=8)
    finally:
        torch.set_default_dtype(previous)
    args = model.args
    d, kv, inter = args.embed_dim, args.num_kv_heads * args.head_dim, args.intermediate_dim
    per_layer_linears = [d * d, d * kv, d * kv, d * d, d * inter, d * inter, d * inter]

    def nf4_bytes(n):  # packed 4-bit data, int8 block scales, per-256-block factors, mean, lookup table
        return n // 2 + n // 64 + (n // 16384) * 2 + 2 + 16 * 2

    expected = args.num_layers * sum(nf4_bytes(n) for n in per_layer_linears)
    expected += 2 * args.vocab_size * d * 2  # bf16 embeddings and output projection
    expected += (2 * args.num_layers + 1) * d * 2  # bf16 norms
    expected += args.num_layers * 8 * ((d + d) + (d + kv)) * 2  # rank-8 adapters on q_proj and v_proj
    assert weight_bytes(model) == expected
    assert 5.6e9 < expected < 5.8e9  # about 5.7 GB, vs 16.1 GB in bf16


@pytest.mark.gpu
def test_qlora_forward_backward_on_cuda():
    from torchft.models import llama

    torch.manual_seed(0)
    # Compared in fp32, as on the CPU: in bf16 the reference's merged DoRA weight is rounded to bf16 once
    # more than the adapter path's, which moves 13-16% of the logits past bf16's default tolerance.
    with torch.device("cuda"):
        model = _tiny_qlora(quantize_base=True, use_dora=True)
        dequantized = llama(**NF4_TINY)
    assert all(is_nf4(m.weight) and m.weight.is_cuda for n, m in model.named_modules() if n.endswith("q_proj"))
    dequantized.load_state_dict(get_merged_state_dict(model))
    tokens = torch.randint(0, 64, (2, 8), device="cuda")
    torch.testing.assert_close(model(tokens), dequantized(tokens))
    # Training runs in bf16: the NF4 CUDA path there gives gradients to the adapters alone.
    model.to(torch.bfloat16)
    set_trainable_params(model, get_adapter_params(model))
    logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    logits.float().logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(get_adapter_params(model))


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_autograd_saves_only_the_nf4_weight(use_dora):
    """No dequantized copy of the base weight is kept for backward (dropout active, training mode)."""
    from torchft.modules.peft import DoRALinear

    torch.manual_seed(0)
    layer = (DoRALinear if use_dora else LoRALinear)(256, 128, 8, 16.0, dropout=0.1, quantize_base=True).train()
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    weight_sized = [t for t in saved if tuple(t.shape) == (128, 256)]
    assert weight_sized and all(is_nf4(t) for t in weight_sized)
    out.sum().backward()
    assert x.grad is not None and layer.lora_a.weight.grad is not None
