"""Every shipped config of the fine-tuning recipes validates and builds its model (on meta, no memory)."""
from pathlib import Path

import pytest
import torch

from torchft import registry
from torchft.config import instantiate, load_config, validate
from torchft.training.setup import default_dtype

CONFIGS = [(recipe, config) for recipe, config in registry.all_configs()
           if recipe.name in ("full_finetune_single_device", "lora_finetune_single_device")]


@pytest.mark.parametrize("recipe,config", CONFIGS, ids=[c.name for _, c in CONFIGS])
def test_config_validates(recipe, config, tmp_path):
    cfg = load_config(config.name, [f"output_dir={tmp_path}"])  # not what earlier runs left in /tmp
    assert validate(cfg, accepted_keys=registry.accepted_keys(recipe), runtime_args=recipe.runtime_args) == []
    for key in ("output_dir", "checkpointer", "tokenizer", "dataset", "batch_size", "gradient_accumulation_steps",
                "max_steps", "epochs", "save_every_n_steps", "resume_from_checkpoint", "device", "dtype", "seed",
                "compile", "enable_activation_checkpointing", "metric_logger"):
        assert key in cfg, f"{config.name} lacks {key}"
    assert ("qlora" in config.name) == ("qlora_" in cfg.model._component_)


# QLoRA builds quantize on meta and take seconds each: the 1B one stands for the others
BUILT = [(r, c) for r, c in CONFIGS if not c.name.startswith(("quickstart", "smollm2")) and
         ("qlora" not in c.name or c.name == "llama3_2/1B_qlora_single_device")]


@pytest.mark.parametrize("recipe,config", BUILT, ids=[c.name for _, c in BUILT])
def test_config_model_builds_on_meta(recipe, config):
    cfg = load_config(config.name)
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = instantiate(cfg.model)
    family, size = config.name.split("/")[0], config.name.split("/")[1].split("_")[0]
    layers = {"1B": 16, "3B": 28, "7B": 32, "8B": 32}[size]
    assert model.args.num_layers == layers
    assert model.args.vocab_size == (32000 if family == "llama2" else 128256)


# HuggingFaceTB/SmolLM2-135M-Instruct's config.json (public), the fields a Llama build reads
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000,
                "tie_word_embeddings": True, "hidden_act": "silu"}


def test_smollm2_config_builds_the_135m_model_from_its_config_json(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    cfg = load_config("smollm2/135M_lora_single_device", [f"checkpointer.checkpoint_dir={tmp_path}"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    names = dict(model.named_parameters())
    base = sum(p.numel() for n, p in names.items() if ".lora_" not in n)
    assert base == 134_515_008  # SmolLM2-135M's size (tied embeddings counted once)
    assert (model.args.num_layers, model.args.num_kv_heads, model.args.rope_base) == (30, 3, 100000)
    assert cfg.device == "cpu" and cfg.tokenizer.max_seq_len == 512
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"SmolLM2-135M-Instruct ({base / 1e6:.1f}M parameters" in readme


ADAPTER_CONFIGS = [(r, c) for r, c in registry.all_configs() if r.name.startswith("lora_finetune")]


@pytest.mark.parametrize("recipe,config", ADAPTER_CONFIGS, ids=[c.name for _, c in ADAPTER_CONFIGS])
def test_every_adapter_config_takes_use_dora(recipe, config):
    # the docs promise `model.use_dora=true` on any LoRA config: the override needs the key to exist
    cfg = load_config(config.name, ["model.use_dora=true"])
    assert cfg.model.use_dora is True
