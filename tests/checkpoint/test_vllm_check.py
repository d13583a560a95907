"""`tune validate --for vllm`: a step folder (merged model + adapter/) against what vLLM serves, one line per problem."""
import json

import pytest

from tests.checkpoint._tiny import save_hf_folder
from torchft.cli import main as cli_main

ADAPTER = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none",
           "modules_to_save": None, "use_dora": False}


@pytest.fixture
def step(tmp_path):
    folder = tmp_path / "step_1"
    save_hf_folder("llama3", folder)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER))
    return folder


def validate(capsys, folder):
    capsys.readouterr()
    code = cli_main.main(["validate", "--for", "vllm", str(folder)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_a_step_folder_vllm_serves(capsys, step):
    assert validate(capsys, step)[:2] == (0, f"OK: {step} (vLLM can serve it)\n")
    assert validate(capsys, step / "adapter")[0] == 0


def test_every_violation_is_one_line(capsys, step):
    config = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"])))
    (step / "adapter" / "adapter_config.json").write_text(json.dumps(dict(
        ADAPTER, r=1024, target_modules=["q_proj", "embed_tokens", "lm_head"], modules_to_save=["lm_head"],
        use_dora=True)))
    code, _, err = validate(capsys, step)
    assert code == 1 and err[0] == f"tune validate: {step}: 5 problems"
    assert "architectures must list LlamaForCausalLM" in err[1]
    assert "rank 1024 must be an integer of at most 512" in err[2]
    assert "target_modules embed_tokens, lm_head: vLLM applies LoRA to" in err[3]
    assert "modules_to_save ['lm_head']" in err[4] and "use_dora is true" in err[5]


def test_an_untied_model_needs_its_lm_head(capsys, tmp_path):
    folder = tmp_path / "m"
    save_hf_folder("llama3", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights.pop("lm_head.weight")
    save_file(weights, folder / "model.safetensors")
    code, _, err = validate(capsys, folder)
    assert code == 1 and "tie_word_embeddings is false but the weights have no lm_head.weight" in err[1]
