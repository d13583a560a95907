"""Presets, the generic builder, LlamaArgs and from_hf_config."""
import json

import pytest
import torch

from torchft.models import LlamaArgs, from_hf_config, llama
from torchft.models import llama2, llama3, llama3_1, llama3_2

# Parameter counts as published (total of the safetensors of the meta-llama repos).
PUBLISHED = {
    llama2.llama2_7b: 6_738_415_616,
    llama2.llama2_13b: 13_015_864_320,
    llama2.llama2_70b: 68_976_648_192,
    llama3.llama3_8b: 8_030_261_248,
    llama3.llama3_70b: 70_553_706_496,
    llama3_1.llama3_1_8b: 8_030_261_248,
    llama3_1.llama3_1_70b: 70_553_706_496,
    llama3_1.llama3_1_405b: 405_853_388_800,
    llama3_2.llama3_2_1b: 1_235_814_400,
    llama3_2.llama3_2_3b: 3_212_749_824,
}


@pytest.mark.parametrize("builder", list(PUBLISHED), ids=lambda b: b.__name__)
def test_preset_builds_on_meta_with_published_parameter_count(builder):
    with torch.device("meta"):
        model = builder()
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[builder]
    assert model.args.num_params() == PUBLISHED[builder]


def test_tied_preset_has_no_lm_head_key():
    with torch.device("meta"):
        model = llama3_2.llama3_2_1b()
    keys = set(model.state_dict())
    assert "lm_head.weight" not in keys and "embed_tokens.weight" in keys
    assert "layers.15.mlp.down_proj.weight" in keys and "norm.weight" in keys


def test_hf_config_round_trip_through_args():
    with torch.device("meta"):
        args = llama3_1.llama3_1_8b().args
    config = args.to_hf_config(dtype=torch.bfloat16)
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["torch_dtype"] == "bfloat16"
    assert LlamaArgs.from_hf_config(config) == args


def test_from_hf_config_reads_transformers5_rope_parameters(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written  # the transformers-5 shape
    args = LlamaArgs.from_hf_config(tmp_path)  # the folder works
    assert args.rope_base == 500000.0 and args.rope_scaling["factor"] == 32.0 and args.tie_word_embeddings
    # The published-repo shape gives the same args.
    published = {k: v for k, v in written.items() if k != "rope_parameters"}
    published["rope_theta"] = 500000.0
    published["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert LlamaArgs.from_hf_config(published) == args


def test_from_hf_config_builds_lora_twin():
    with torch.device("meta"):
        args = llama3_2.llama3_2_1b().args
    with torch.device("meta"):
        model = from_hf_config(args.to_hf_config(), lora_attn_modules=["q_proj", "v_proj"], lora_rank=4)
    keys = set(model.state_dict())
    assert "layers.0.self_attn.q_proj.lora_a.weight" in keys and "layers.0.self_attn.k_proj.lora_a.weight" not in keys


BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, model_type="llama", architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]),
     r"describes model_type 'mistral' \(MistralForCausalLM\); torchft builds Llama-architecture models"),
    (dict(model_type=None, architectures=None), r"no model_type or architectures field"),
    (dict(num_key_value_heads=3), r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
    (dict(hidden_size=66), r"embed_dim \(66\) must be divisible by num_heads \(4\)"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"lacks low_freq_factor, high_freq_factor"),
    (dict(vocab_size=None), r"missing required field\(s\) vocab_size"),
])
def test_bad_config_is_one_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaArgs.from_hf_config({**BASE, **change})


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json: no such file"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(line 1"):
        from_hf_config(tmp_path)


def test_builder_rejects_bad_dimensions():
    with pytest.raises(ValueError, match=r"num_heads \(32\) must be divisible by num_kv_heads \(6\)"):
        llama(vocab_size=10, num_layers=1, num_heads=32, num_kv_heads=6, embed_dim=64, intermediate_dim=32,
              max_seq_len=16)
    with pytest.raises(ValueError, match=r"head_dim \(3\) must be a positive even number"):
        llama(vocab_size=10, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=6, intermediate_dim=32,
              max_seq_len=16)
    with pytest.raises(ValueError, match=r"vocab_size must be a positive integer, got 0"):
        llama(vocab_size=0, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=8, intermediate_dim=32,
              max_seq_len=16)
