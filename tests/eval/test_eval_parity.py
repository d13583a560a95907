"""torchft's lm-eval wrapper against lm-eval's own HF backend on the same tiny weights and tokenizer."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (torchft[eval])")

ASSETS = Path(__file__).parents[1] / "assets"
sys.path.insert(0, str(ASSETS))
from tiny_llama_pair import make_pair, save_tiny_tokenizer  # noqa: E402

TASKS_DIR = ASSETS / "lm_eval_tasks"
TASKS = ["torchft_tiny_mc", "torchft_tiny_gen", "torchft_tiny_ppl"]
MAX_LEN = 24  # short enough that perplexity documents span several rolling windows


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no_bos"])
def setup(tmp_path_factory, request):
    """Weights and a tokenizer whose post-processor adds BOS (Llama) or adds none: the wrapper's
    default BOS must follow the tokenizer, as lm-eval's HF backend does."""
    from torchft.data.tokenizers import hf_tokenizer

    tok_dir = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), adds_bos=request.param)
    hf_model, model = make_pair(seed=1)
    return hf_model, model, tok_dir, hf_tokenizer(str(tok_dir))


def _run(lm, task_manager):
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager, bootstrap_iters=0, log_samples=True)


@pytest.fixture(scope="module")
def both_results(setup):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from torchft.eval import TorchFTEvalWrapper

    hf_model, model, tok_dir, tokenizer = setup
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    reference = HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(tok_dir), batch_size=3,
                     max_length=MAX_LEN, device="cpu")
    ours = TorchFTEvalWrapper(model, tokenizer, max_seq_len=MAX_LEN, batch_size=3)
    return _run(reference, tm), _run(ours, tm)


@pytest.mark.parametrize("task", TASKS)
def test_metrics_match_hf_backend(both_results, task):
    reference, ours = both_results
    ref_metrics, our_metrics = reference["results"][task], ours["results"][task]
    compared = [k for k, v in ref_metrics.items() if isinstance(v, float) and "stderr" not in k]
    assert compared
    for key in compared:
        assert our_metrics[key] == pytest.approx(ref_metrics[key], abs=1e-4), key


def test_per_example_outputs_match_hf_backend(both_results):
    reference, ours = both_results
    for task in TASKS:
        for ref_sample, our_sample in zip(reference["samples"][task], ours["samples"][task], strict=True):
            ref_resps, our_resps = ref_sample["filtered_resps"], our_sample["filtered_resps"]
            if task == "torchft_tiny_gen":  # generated strings must be identical
                assert our_resps == ref_resps
            else:  # (log-likelihood, is_greedy) pairs, or rolling log-likelihoods
                flat = lambda r: [x for item in r for x in (item if isinstance(item, (list, tuple)) else [item])]
                assert flat(our_resps) == pytest.approx(flat(ref_resps), abs=1e-4)
    # The generation task really generated something (not all-empty strings).
    assert any(s["filtered_resps"][0] for s in ours["samples"]["torchft_tiny_gen"])
