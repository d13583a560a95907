"""LoRALinear / DoRALinear: formulas, initialization, meta loading, HF peft parity, bad input."""
import collections
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchft.modules.peft import DoRALinear, LoRALinear, validate_lora_targets

IN_DIM, OUT_DIM, RANK, ALPHA = 32, 48, 4, 8.0


def _random_adapter(layer: LoRALinear, seed: int = 0) -> None:
    """Non-zero lora_b (and a magnitude away from ||W||) so adapter tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_a.weight.copy_(torch.randn(layer.lora_a.weight.shape, generator=g) * 0.3)
        layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=g) * 0.3)
        if isinstance(layer, DoRALinear):
            layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=g))


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_output_equals_base_at_init(cls):
    torch.manual_seed(0)
    layer = cls(IN_DIM, OUT_DIM, RANK, ALPHA, use_bias=True)
    x = torch.randn(2, 5, IN_DIM)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    assert torch.count_nonzero(layer.lora_a.weight) == RANK * IN_DIM  # Kaiming-uniform, not zero


def test_lora_formula_names_and_frozen_base():
    torch.manual_seed(0)
    layer = LoRALinear(IN_DIM, OUT_DIM, RANK, ALPHA, use_bias=True)
    _random_adapter(layer)
    x = torch.randn(3, IN_DIM)
    expected = x @ layer.weight.T + layer.bias + (ALPHA / RANK) * (x @ layer.lora_a.weight.T @ layer.lora_b.weight.T)
    torch.testing.assert_close(layer(x), expected)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_a.weight", "lora_b.weight"}
    assert layer.lora_a.weight.shape == (RANK, IN_DIM) and layer.lora_b.weight.shape == (OUT_DIM, RANK)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    layer.disabled = True
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_lora_a_init_is_kaiming_uniform_bound():
    torch.manual_seed(0)
    layer = LoRALinear(256, 8, 64, 16.0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on fan_in 256
    assert layer.lora_a.weight.abs().max() <= bound
    assert layer.lora_a.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_merged_weight_equals_adapter_forward(cls):
    torch.manual_seed(0)
    layer = cls(IN_DIM, OUT_DIM, RANK, ALPHA, use_bias=True)
    _random_adapter(layer)
    x = torch.randn(4, IN_DIM)
    merged = F.linear(x, layer.merged_weight(), layer.bias)
    torch.testing.assert_close(merged, layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, F.linear(x, layer.weight, layer.bias), atol=1e-3)


def test_dora_magnitude_is_row_norm_of_base_weight():
    torch.manual_seed(0)
    layer = DoRALinear(IN_DIM, OUT_DIM, RANK, ALPHA)
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(layer.weight, dim=1))
    assert layer.magnitude.shape == (OUT_DIM,) and layer.magnitude.requires_grad
    assert set(layer.state_dict()) == {"weight", "lora_a.weight", "lora_b.weight", "magnitude"}


def test_dora_magnitude_follows_a_loaded_base_weight_unless_given():
    torch.manual_seed(0)
    layer = DoRALinear(IN_DIM, OUT_DIM, RANK, ALPHA)
    new_weight = torch.randn(OUT_DIM, IN_DIM)
    layer.load_state_dict({"weight": new_weight}, strict=False)
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(new_weight, dim=1))
    given = torch.rand(OUT_DIM)
    layer.load_state_dict({"weight": new_weight, "magnitude": given}, strict=False)
    assert torch.equal(layer.magnitude.detach(), given)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("checkpoint_dtype", [torch.bfloat16, torch.float32])
def test_build_on_meta_then_assign_load(use_dora, checkpoint_dtype):
    cls = DoRALinear if use_dora else LoRALinear
    torch.manual_seed(0)
    reference = cls(IN_DIM, OUT_DIM, RANK, ALPHA, use_bias=True)
    _random_adapter(reference)
    state_dict = {k: v.to(checkpoint_dtype) for k, v in reference.state_dict().items()}
    with torch.device("meta"):
        layer = cls(IN_DIM, OUT_DIM, RANK, ALPHA, use_bias=True)
    assert layer.weight.is_meta
    layer.load_state_dict(state_dict, assign=True)
    assert layer.weight.dtype == checkpoint_dtype and not layer.weight.requires_grad
    assert layer.lora_a.weight.requires_grad
    x = torch.randn(2, IN_DIM, dtype=checkpoint_dtype)
    torch.testing.assert_close(layer(x), reference.to(checkpoint_dtype)(x))


def test_dora_matches_hf_peft_forward_and_gradients():
    """Same numbers as peft's DoRA layer (detached norm), forward and gradients, incl. dropout."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ours = DoRALinear(IN_DIM, OUT_DIM, RANK, ALPHA, dropout=0.25, use_bias=True)
    _random_adapter(ours)
    base = nn.Sequential(collections.OrderedDict(proj=nn.Linear(IN_DIM, OUT_DIM)))
    with torch.no_grad():
        base.proj.weight.copy_(ours.weight)
        base.proj.bias.copy_(ours.bias)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.25, target_modules=["proj"], use_dora=True)
    peft_model = get_peft_model(base, config)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_a.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_b.weight)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)

    x = torch.randn(3, 5, IN_DIM)
    for training in (False, True):
        ours.train(training)
        peft_model.train(training)
        torch.manual_seed(1)  # same dropout mask: both draw it once, on x
        out_ours = ours(x)
        torch.manual_seed(1)
        out_peft = peft_model(x)
        torch.testing.assert_close(out_ours, out_peft, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out_ours)
        ours_grads = torch.autograd.grad(out_ours, [ours.lora_a.weight, ours.lora_b.weight, ours.magnitude], grad)
        peft_grads = torch.autograd.grad(
            out_peft,
            [
                peft_layer.lora_A["default"].weight,
                peft_layer.lora_B["default"].weight,
                peft_layer.lora_magnitude_vector["default"].weight,
            ],
            grad,
        )
        for g_ours, g_peft in zip(ours_grads, peft_grads):
            torch.testing.assert_close(g_ours, g_peft, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_only_adapter_params_get_gradients(cls):
    torch.manual_seed(0)
    layer = cls(IN_DIM, OUT_DIM, RANK, ALPHA, dropout=0.1, use_bias=True)
    _random_adapter(layer)
    layer(torch.randn(2, IN_DIM)).pow(2).sum().backward()
    with_grad = {name for name, p in layer.named_parameters() if p.grad is not None}
    assert with_grad == set(layer.adapter_param_names())
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), r"lora rank \(0\) must be a positive integer"),
        (dict(rank=-2), r"lora rank \(-2\) must be a positive integer"),
        (dict(rank=2.5), r"lora rank \(2.5\) must be a positive integer"),
        (dict(alpha=0), r"lora alpha \(0\) must be positive"),
        (dict(alpha=-1.0), r"lora alpha \(-1.0\) must be positive"),
        (dict(dropout=1.0), r"lora dropout \(1.0\) must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"lora dropout \(-0.1\) must be in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_bad_hyper_parameters(cls, kwargs, match):
    args = dict(in_dim=IN_DIM, out_dim=OUT_DIM, rank=RANK, alpha=ALPHA) | kwargs
    with pytest.raises(ValueError, match=match):
        cls(**args)


def test_validate_lora_targets():
    assert validate_lora_targets(("q_proj", "v_proj")) == ["q_proj", "v_proj"]
    assert validate_lora_targets([]) == []
    with pytest.raises(ValueError, match=r"unknown LoRA target module 'gate_proj'.*valid names: q_proj k_proj v_proj o_proj"):
        validate_lora_targets(["q_proj", "gate_proj"])
    with pytest.raises(ValueError, match=r"must be a list of names, got the string 'q_proj'"):
        validate_lora_targets("q_proj")


def test_builder_rejects_unknown_target():
    from torchft.models import llama

    with pytest.raises(ValueError, match=r"unknown LoRA target module 'qkv'.*valid names: q_proj k_proj v_proj o_proj"):
        llama(64, 1, 4, 2, 64, 128, 32, lora_attn_modules=["qkv"])


def _saved_for_backward_bytes(module, x) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of ``module(x)``."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x).sum().backward()
    return sum(saved.values())


def test_dora_keeps_no_in_by_in_tensor_for_backward():
    # The weight norm is detached: computing it must leave nothing of size [in, in] (nor [out, in]) in the graph.
    torch.manual_seed(0)
    in_dim, out_dim, tokens = 1024, 64, 8
    layer = DoRALinear(in_dim, out_dim, rank=4, alpha=8)
    x = torch.randn(1, tokens, in_dim)
    saved = _saved_for_backward_bytes(layer, x)
    lora = LoRALinear(in_dim, out_dim, rank=4, alpha=8)
    assert saved < in_dim * in_dim * 4 / 16  # 4 MB before: the identity matrix through lora_a
    # What DoRA keeps beyond LoRA scales with the tokens and out_dim only (the base output, the scale).
    assert saved - _saved_for_backward_bytes(lora, x) <= 4 * (2 * tokens * out_dim + 2 * out_dim) + 1024
