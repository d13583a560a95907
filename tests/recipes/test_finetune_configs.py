"""Every shipped config of the fine-tuning recipes validates and builds its model (on meta, no memory)."""
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
BUILT = [(r, c) for r, c in CONFIGS if not c.name.startswith("quickstart") and
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


ADAPTER_CONFIGS = [(r, c) for r, c in registry.all_configs() if r.name.startswith("lora_finetune")]


@pytest.mark.parametrize("recipe,config", ADAPTER_CONFIGS, ids=[c.name for _, c in ADAPTER_CONFIGS])
def test_every_adapter_config_takes_use_dora(recipe, config):
    # the docs promise `model.use_dora=true` on any LoRA config: the override needs the key to exist
    cfg = load_config(config.name, ["model.use_dora=true"])
    assert cfg.model.use_dora is True
