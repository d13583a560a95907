"""Model-level adapter utilities on a tiny torchft Llama: params, training, checked loads, merge, disable."""
import pytest
import torch

from torchft.models import llama
from torchft.modules.peft import (
    disable_adapter,
    get_adapter_params,
    get_adapter_state_dict,
    get_merged_state_dict,
    initialize_adapters,
    load_adapter_state_dict,
    load_base_state_dict,
    set_trainable_params,
    validate_lora_state_dict,
    validate_missing_and_unexpected_for_lora,
    weight_bytes,
)

TINY = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=32)
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True, lora_rank=4,
            lora_alpha=8.0)
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _plain_and_lora(use_dora=False, seed=0):
    torch.manual_seed(seed)
    plain = llama(**TINY).eval()
    lora = llama(**TINY, **LORA, use_dora=use_dora).eval()
    load_base_state_dict(lora, plain.state_dict())  # DoRA magnitudes follow the loaded weights
    return plain, lora


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in get_adapter_params(model).items():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_adapter_params_are_exactly_the_lora_weights():
    _, lora = _plain_and_lora(use_dora=True)
    names = set(get_adapter_params(lora))
    modules = [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    modules += [f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")] + ["lm_head"]
    assert names == {f"{m}.{p}" for m in modules for p in ("lora_a.weight", "lora_b.weight", "magnitude")}
    assert set(get_adapter_state_dict(lora)) == names


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_model_equals_base_at_init_and_only_adapters_train(use_dora):
    plain, lora = _plain_and_lora(use_dora)
    torch.testing.assert_close(lora(TOKENS), plain(TOKENS))
    adapters = get_adapter_params(lora)
    set_trainable_params(lora, adapters)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == set(adapters)
    lora.train()
    lora(TOKENS).logsumexp(-1).mean().backward()
    assert {n for n, p in lora.named_parameters() if p.grad is not None} == set(adapters)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_state_dict_loads_into_plain_model_with_same_output(use_dora):
    plain, lora = _plain_and_lora(use_dora)
    _randomize(lora)
    merged = get_merged_state_dict(lora)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)  # strict: no adapter keys left, none missing
    with torch.no_grad():
        torch.testing.assert_close(plain(TOKENS), lora(TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_disable_adapter_gives_base_output(use_dora):
    plain, lora = _plain_and_lora(use_dora)
    _randomize(lora)
    with torch.no_grad():
        adapted = lora(TOKENS)
        with disable_adapter(lora):
            torch.testing.assert_close(lora(TOKENS), plain(TOKENS))
        torch.testing.assert_close(lora(TOKENS), adapted)
    assert not torch.allclose(adapted, plain(TOKENS), atol=1e-3)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_build_on_meta_then_load_base_and_init_adapters(use_dora, device):
    plain, _ = _plain_and_lora()
    with torch.device("meta"):
        lora = llama(**TINY, **LORA, use_dora=use_dora)
    load_base_state_dict(lora, plain.state_dict(), assign=True, device=device)
    assert all(p.is_meta for p in get_adapter_params(lora).values())
    initialize_adapters(lora, device="cpu")
    assert not any(p.is_meta for p in lora.parameters())
    torch.testing.assert_close(lora.eval()(TOKENS), plain(TOKENS))


def test_base_load_casts_one_layer_at_a_time():
    plain, _ = _plain_and_lora()
    with torch.device("meta"):
        lora = llama(**TINY, **LORA)
    load_base_state_dict(lora, plain.state_dict(), assign=True, device="cpu", dtype=torch.bfloat16)
    assert lora.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert lora.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("device", [None, "cpu"])
def test_full_state_dict_with_adapters_passes_the_base_load(device):
    _, lora = _plain_and_lora(use_dora=True)
    _randomize(lora)
    with torch.device("meta"):
        other = llama(**TINY, **LORA, use_dora=True)
    load_base_state_dict(other, lora.state_dict(), assign=True, device=device)
    assert torch.equal(other.eval()(TOKENS), lora(TOKENS))


def test_adapter_round_trip_into_meta_model():
    _, lora = _plain_and_lora(use_dora=True)
    _randomize(lora)
    plain_state = {k: v for k, v in lora.state_dict().items() if k not in get_adapter_params(lora)}
    with torch.device("meta"):
        other = llama(**TINY, **LORA, use_dora=True)
    load_base_state_dict(other, plain_state, assign=True)
    load_adapter_state_dict(other, get_adapter_state_dict(lora))
    assert torch.equal(other.eval()(TOKENS), lora(TOKENS))


def test_checked_loads_name_the_bad_keys():
    plain, lora = _plain_and_lora()
    base = plain.state_dict()
    with pytest.raises(ValueError, match=r"base state dict has keys the model does not have: extra.weight"):
        load_base_state_dict(lora, base | {"extra.weight": torch.zeros(1)})
    without_norm = {k: v for k, v in base.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"base state dict is missing keys: norm.weight"):
        load_base_state_dict(lora, without_norm)
    with pytest.raises(ValueError, match=r"base state dict: layers.0.self_attn.q_proj.weight has shape \[64, 32\], "
                                         r"the model expects \[64, 64\]"):
        load_base_state_dict(lora, base | {"layers.0.self_attn.q_proj.weight": torch.zeros(64, 32)})
    adapters = get_adapter_state_dict(lora)
    with pytest.raises(ValueError, match=r"adapter state dict has keys that are not adapter weights: norm.weight"):
        load_adapter_state_dict(lora, adapters | {"norm.weight": base["norm.weight"]})
    with pytest.raises(ValueError, match=r"adapter state dict is missing keys: lm_head.lora_a.weight"):
        load_adapter_state_dict(lora, {k: v for k, v in adapters.items() if k != "lm_head.lora_a.weight"})
    with pytest.raises(ValueError, match=r"kind \('full'\) must be 'base' or 'adapter'"):
        validate_lora_state_dict(lora, base, kind="full")


def test_post_load_check_of_missing_and_unexpected_keys():
    plain, lora = _plain_and_lora()
    base = plain.state_dict()
    result = lora.load_state_dict(base, strict=False)
    validate_missing_and_unexpected_for_lora(lora, result.missing_keys, result.unexpected_keys, kind="base")
    result = lora.load_state_dict(get_adapter_state_dict(lora), strict=False)
    validate_missing_and_unexpected_for_lora(lora, result.missing_keys, result.unexpected_keys, kind="adapter")
    result = lora.load_state_dict({k: v for k, v in base.items() if k != "norm.weight"}, strict=False)
    with pytest.raises(ValueError, match=r"base load: missing keys: norm.weight$"):
        validate_missing_and_unexpected_for_lora(lora, result.missing_keys, result.unexpected_keys, kind="base")
    with pytest.raises(ValueError, match=r"adapter load: missing keys: lm_head.lora_a.weight"):
        validate_missing_and_unexpected_for_lora(lora, ["lm_head.lora_a.weight"], [], kind="adapter")
    with pytest.raises(ValueError, match=r"base load: unexpected keys: bogus"):
        validate_missing_and_unexpected_for_lora(lora, [], ["bogus"], kind="base")


def test_weight_bytes_of_plain_and_lora_models():
    plain, lora = _plain_and_lora()
    assert weight_bytes(plain) == sum(p.numel() * p.element_size() for p in plain.parameters())
    adapter_bytes = sum(p.numel() * 4 for p in get_adapter_params(lora).values())
    assert weight_bytes(lora) == weight_bytes(plain) + adapter_bytes
