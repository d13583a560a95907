"""load_model: an HF folder plus a PEFT adapter folder gives transformers+peft's logits, merged or not."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "assets"))
from tiny_llama_pair import save_tiny_checkpoint  # noqa: E402

from torchft.generation import load_model  # noqa: E402


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_folder_matches_peft(tmp_path, use_dora):
    from peft import LoraConfig, get_peft_model

    folder, hf_model = save_tiny_checkpoint(tmp_path / "base", seed=8)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False, use_dora=use_dora)
    peft_model = get_peft_model(copy.deepcopy(hf_model), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    probe = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        expected = peft_model(probe).logits
        adapted = load_model(folder, adapter_dir=tmp_path / "adapter", dtype=torch.float32)
        merged = load_model(folder, adapter_dir=tmp_path / "adapter", merge_adapter=True, dtype=torch.float32)
        torch.testing.assert_close(adapted(probe), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(probe), expected, atol=1e-5, rtol=1e-5)
        assert (adapted(probe) - hf_model(probe).logits).abs().max() > 1e-3  # the adapter really changes things
    assert not any("lora_" in k for k in merged.state_dict())
