"""evaluate() / eval_hook(): clear errors for bad tasks and offline data, the adapter check, the hook."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (torchft[eval])")

ASSETS = Path(__file__).parents[1] / "assets"
sys.path.insert(0, str(ASSETS))
from tiny_llama_pair import make_pair, save_tiny_tokenizer, tiny_hf_config  # noqa: E402

from torchft.eval import TaskDataUnavailableError, eval_hook, evaluate  # noqa: E402

TASKS_DIR = ASSETS / "lm_eval_tasks"


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from torchft.data.tokenizers import hf_tokenizer

    _, model = make_pair(seed=2)
    return model, hf_tokenizer(str(save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_unknown_task_lists_close_names(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'torchft_tiny_mcq' \(close names: torchft_tiny_mc"):
        evaluate(model, tok, ["torchft_tiny_mcq"], include_path=TASKS_DIR, include_defaults=False)


def test_missing_include_path_is_named(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    with pytest.raises(FileNotFoundError, match="include_path .*nowhere does not exist"):
        evaluate(model, tok, ["torchft_tiny_mc"], include_path=tmp_path / "nowhere")


def test_task_needing_network_when_offline_says_so(model_and_tokenizer, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tok = model_and_tokenizer
    with pytest.raises(TaskDataUnavailableError, match=r"task data must be downloaded but HF_DATASETS_OFFLINE is set"):
        evaluate(model, tok, ["torchft_needs_hub"], include_path=TASKS_DIR, include_defaults=False, limit=2)


def _lora_model(base):
    from torchft.models import from_hf_config

    model = from_hf_config(tiny_hf_config().to_dict(), lora_attn_modules=["q_proj", "v_proj"], lora_rank=4)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    return model.eval()


def test_zero_adapter_fails_loudly(model_and_tokenizer):
    model, tok = model_and_tokenizer
    lora = _lora_model(model)
    with torch.no_grad():  # a never-loaded adapter: lora_b all zeros, so tuned == base
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.zero_()
    with pytest.raises(ValueError, match="adapter has no effect: the model's logits with the adapter equal the base"):
        evaluate(lora, tok, ["torchft_tiny_mc"], include_path=TASKS_DIR, include_defaults=False, limit=1)


def test_trained_adapter_is_evaluated_and_changes_scores(model_and_tokenizer):
    model, tok = model_and_tokenizer
    lora = _lora_model(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.5)
    kwargs = dict(include_path=TASKS_DIR, include_defaults=False, log_samples=True)
    tuned = evaluate(lora, tok, ["torchft_tiny_mc"], **kwargs)
    base = evaluate(model, tok, ["torchft_tiny_mc"], **kwargs)
    logliks = lambda r: [x[0] for s in r["samples"]["torchft_tiny_mc"] for x in s["filtered_resps"]]
    assert logliks(tuned) != pytest.approx(logliks(base), abs=1e-3)


def test_eval_hook_returns_flat_metrics_and_restores_mode(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model.train()
    metrics = eval_hook(model, tok, ["torchft_tiny_mc", "torchft_tiny_ppl"], include_path=TASKS_DIR,
                       include_defaults=False, limit=4)
    assert model.training
    full = evaluate(model, tok, ["torchft_tiny_mc"], include_path=TASKS_DIR, include_defaults=False, limit=4)
    assert metrics["torchft_tiny_mc/acc"] == full["results"]["torchft_tiny_mc"]["acc,none"]
    assert set(metrics) == {
        "torchft_tiny_mc/acc", "torchft_tiny_mc/acc_norm", "torchft_tiny_ppl/word_perplexity",
        "torchft_tiny_ppl/byte_perplexity", "torchft_tiny_ppl/bits_per_byte",
    }


def test_eval_hook_leaves_the_global_rngs_as_they_were(model_and_tokenizer):
    """A training loop that evaluates every N steps draws the same random numbers as one that does not."""
    import random

    import numpy as np

    model, tok = model_and_tokenizer
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    eval_hook(model, tok, ["torchft_tiny_mc"], include_path=TASKS_DIR, include_defaults=False, limit=2)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


def test_wrapper_bos_follows_the_tokenizer_or_the_setting(tmp_path):
    from torchft.data.tokenizers import hf_tokenizer
    from torchft.eval import TorchFTEvalWrapper

    _, model = make_pair(seed=2)
    tok = hf_tokenizer(str(save_tiny_tokenizer(tmp_path, adds_bos=False)))
    text_ids = tok.encode("the cat", add_bos=False, add_eos=False)
    assert TorchFTEvalWrapper(model, tok).tok_encode("the cat") == text_ids  # the tokenizer adds none
    assert TorchFTEvalWrapper(model, tok, add_bos=True).tok_encode("the cat") == [tok.bos_id, *text_ids]
    assert TorchFTEvalWrapper(model, tok, add_bos=False).tok_encode("the cat", add_special_tokens=None) == text_ids
