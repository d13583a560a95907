"""HF PEFT adapters both ways: torchft -> peft and peft -> torchft give the same logits (fp32, CPU)."""
import json
import warnings

import pytest
import torch

from torchft.checkpoint.peft import (
    load_peft_adapter,
    peft_config_to_lora_kwargs,
    read_peft_adapter_config,
    save_peft_adapter,
)
from torchft.models import from_hf_config, llama
from torchft.modules.peft import (
    DoRALinear,
    get_adapter_params,
    get_lora_modules,
    get_merged_state_dict,
    load_base_state_dict,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_hf_llama(seed=0, hidden_size=64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _torchft_from_hf(hf_model, **lora_kwargs):
    """A torchft LoRA model holding the transformers model's base weights (adapters fresh)."""
    model = from_hf_config(hf_model.config.to_dict(), **lora_kwargs).eval()
    base = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    load_base_state_dict(model, base)
    return model


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in get_adapter_params(model).items():
            if name.endswith("magnitude"):
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _randomize_peft_adapters(peft_model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "use_dora, lora_kwargs",
    [
        (False, dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True)),
        (True, dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True)),
    ],
    ids=["lora", "dora"],
)
def test_torchft_adapter_loads_in_peft_with_same_logits(tmp_path, use_dora, lora_kwargs):
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    hf_model = _tiny_hf_llama()
    model = _torchft_from_hf(hf_model, lora_rank=4, lora_alpha=8.0, use_dora=use_dora, **lora_kwargs)
    _randomize_adapters(model)
    (tmp_path / "other.txt").write_text("kept")
    save_peft_adapter(model, tmp_path, base_model_name_or_path="org/tiny-llama")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "other.txt"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 8.0, use_dora)
    assert config["base_model_name_or_path"] == "org/tiny-llama"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model, tmp_path).eval()
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(tmp_path)))
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "lora_" in k]

    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), peft_model(TOKENS).logits, rtol=1e-5, atol=1e-5)
        with peft_model.disable_adapter():
            assert not torch.allclose(model(TOKENS), peft_model(TOKENS).logits, atol=1e-3)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_torchft_with_same_logits(tmp_path, use_dora):
    from peft import LoraConfig, get_peft_model

    hf_model = _tiny_hf_llama()
    targets = ALL_LINEARS + (["lm_head"] if not use_dora else [])
    peft_config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=use_dora, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that it saves the lm_head base weight
        peft_model = get_peft_model(hf_model, peft_config).eval()
        _randomize_peft_adapters(peft_model)
        peft_model.save_pretrained(tmp_path)

    kwargs = peft_config_to_lora_kwargs(read_peft_adapter_config(tmp_path))
    assert kwargs["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and kwargs["apply_lora_to_mlp"]
    assert kwargs["use_dora"] == use_dora and kwargs["apply_lora_to_output"] == (not use_dora)
    model = _torchft_from_hf(_tiny_hf_llama(), **kwargs)  # a fresh copy of the same base weights
    assert all(isinstance(m, DoRALinear) == use_dora for m in get_lora_modules(model).values())
    load_peft_adapter(model, tmp_path)

    with torch.no_grad():
        expected = peft_model(TOKENS).logits
        torch.testing.assert_close(model(TOKENS), expected, rtol=1e-5, atol=1e-5)
        # Merging agrees with peft's own merge, and the merged weights load into a plain model.
        merged = get_merged_state_dict(model)
        assert not [k for k in merged if "lora_" in k or k.endswith("magnitude")]
        plain = from_hf_config(hf_model.config.to_dict()).eval()
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(TOKENS), expected, rtol=1e-4, atol=2e-4)  # fp32 summation order
        peft_merged = peft_model.merge_and_unload().state_dict()
        for key, tensor in merged.items():
            hf_key = key if key.startswith("lm_head") else "model." + key
            torch.testing.assert_close(tensor, peft_merged[hf_key], rtol=1e-5, atol=1e-6)


# ---- bad adapters: one clear error each -------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A torchft adapter (rank 4, alpha 8, q_proj+v_proj) and the kwargs of the model it fits."""
    folder = tmp_path_factory.mktemp("adapter")
    kwargs = dict(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0)
    model = _torchft_from_hf(_tiny_hf_llama(), **kwargs)
    _randomize_adapters(model)
    save_peft_adapter(model, folder, base_model_name_or_path="org/tiny-llama")
    return folder, kwargs


def _tiny_torchft(hidden_size=64, **kwargs):
    return llama(96, 2, 4, 2, hidden_size, 128, 64, **kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(lora_rank=8), r"adapter_config.json: r=4 does not match the model's lora_rank \(8\)"),
        (dict(lora_alpha=16.0), r"adapter_config.json: lora_alpha=8.0 does not match the model's lora_alpha \(16.0\)"),
        (dict(use_dora=True), r"adapter_config.json: use_dora=False does not match the model's use_dora \(True\)"),
        (dict(lora_attn_modules=["q_proj", "k_proj"]),
         r"target_modules \['q_proj', 'v_proj'\] do not match the model's LoRA layers \['k_proj', 'q_proj'\]"),
        (dict(hidden_size=128),
         r"layers.0.self_attn.q_proj.lora_a.weight has shape \[4, 64\], the model expects \[4, 128\]"),
    ],
)
def test_adapter_that_disagrees_with_the_model(saved_adapter, overrides, match):
    folder, kwargs = saved_adapter
    model = _tiny_torchft(**(kwargs | overrides))
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(model, folder)


def test_adapter_for_another_base_or_type(saved_adapter, tmp_path):
    folder, kwargs = saved_adapter
    model = _tiny_torchft(**kwargs)
    with pytest.raises(ValueError, match=r"adapter is for base model 'org/tiny-llama', not 'org/other-llama'"):
        load_peft_adapter(model, folder, base_model_name_or_path="org/other-llama")
    load_peft_adapter(model, folder, base_model_name_or_path="org/tiny-llama")  # the right base is fine

    other = tmp_path / "loha"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text()) | {"peft_type": "LOHA"}
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"peft_type 'LOHA' is not supported; torchft loads 'LORA' adapters"):
        load_peft_adapter(model, other)
    (other / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "LORA", "use_rslora": True}))
    with pytest.raises(ValueError, match=r"use_rslora=True is not supported"):
        load_peft_adapter(model, other)
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json: no such file"):
        load_peft_adapter(model, tmp_path / "nowhere")


def test_adapter_with_keys_the_model_lacks(saved_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, kwargs = saved_adapter
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    extra = dict(tensors, **{"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})
    save_file(extra, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"keys that are not adapter weights: layers.9.self_attn.q_proj.lora_a.weight"):
        load_peft_adapter(_tiny_torchft(**kwargs), tmp_path)
    fewer = {k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}
    save_file(fewer, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: layers.1.self_attn.v_proj.lora_a.weight"):
        load_peft_adapter(_tiny_torchft(**kwargs), tmp_path)


def test_model_without_adapters_cannot_save(tmp_path):
    with pytest.raises(ValueError, match=r"the model has no LoRA/DoRA layers"):
        save_peft_adapter(_tiny_torchft(), tmp_path)


def test_save_with_a_gathered_adapter_state_dict(tmp_path):
    from safetensors.torch import load_file

    from torchft.modules.peft import get_adapter_state_dict

    model = _tiny_torchft(lora_attn_modules=["v_proj"], lora_rank=2, lora_alpha=4.0)
    gathered = {k: torch.full_like(v, 0.5) for k, v in get_adapter_state_dict(model).items()}
    save_peft_adapter(model, tmp_path, adapter_state_dict=gathered)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].eq(0.5).all()
    assert len(saved) == len(gathered)
    with pytest.raises(ValueError, match=r"adapter state dict is missing keys: layers.1.self_attn.v_proj.lora_b.weight"):
        save_peft_adapter(model, tmp_path, adapter_state_dict={k: v for k, v in gathered.items() if "1.self_attn.v_proj.lora_b" not in k})


def test_a_step_folder_loads_the_adapter_inside_it(saved_adapter, tmp_path):
    """A run's step_<N>/ folder holds the merged model and, in adapter/, the adapter: naming the step
    folder loads that adapter; a folder with neither says what it expected."""
    folder, kwargs = saved_adapter
    step = tmp_path / "step_10"
    (step / "adapter").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (step / "adapter" / name).write_bytes((folder / name).read_bytes())
    (step / "config.json").write_text("{}")  # the merged model's files sit beside adapter/
    from_step, from_adapter = _tiny_torchft(**kwargs), _tiny_torchft(**kwargs)
    assert read_peft_adapter_config(step) == read_peft_adapter_config(folder)
    load_peft_adapter(from_step, step)
    load_peft_adapter(from_adapter, folder)
    torch.testing.assert_close(get_adapter_params(from_step), get_adapter_params(from_adapter), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"step_9/adapter_config.json: no such file; expected a PEFT adapter "
                                                r"folder \(or a step_<N> folder with adapter/adapter_config.json\)"):
        load_peft_adapter(from_step, tmp_path / "step_9")
