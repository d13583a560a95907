"""`tune run eleuther_eval`: a base checkpoint plus a PEFT adapter folder scores like lm-eval's HF backend on
the same (merged) weights; a zero adapter and an unknown task stop the run with one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (torchft[eval])")

ASSETS = Path(__file__).parents[1] / "assets"
sys.path.insert(0, str(ASSETS))
from tiny_llama_pair import save_tiny_checkpoint  # noqa: E402

TASKS_DIR = ASSETS / "lm_eval_tasks"
MAX_LEN = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5)


def _save_adapter(hf_model, folder, trained: bool):
    """An HF PEFT LoRA adapter on q/v (B = 0 when not trained, as peft initialises it)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=not trained)
    peft_model = get_peft_model(copy.deepcopy(hf_model), config)
    peft_model.save_pretrained(folder)
    return peft_model


def _overrides(ckpt, out, *extra):
    return [
        f"checkpoint_dir={ckpt}", f"output_dir={out}", f"include_path={TASKS_DIR}", "device=cpu",
        "dtype=fp32", f"max_seq_len={MAX_LEN}", "batch_size=4", "include_default_tasks=false", *extra,
    ]


def test_adapter_results_match_hf_backend(checkpoint, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from torchft._recipes.eleuther_eval import main
    from torchft.config import load_config

    ckpt, hf_model = checkpoint
    peft_model = _save_adapter(hf_model, tmp_path / "adapter", trained=True)
    tasks = ["torchft_tiny_mc", "torchft_tiny_ppl"]
    cfg = load_config("eleuther_evaluation", _overrides(ckpt, tmp_path / "out", f"adapter_dir={tmp_path / 'adapter'}",
                                                        f"tasks=[{','.join(tasks)}]"))
    main(cfg)
    ours = json.loads((tmp_path / "out" / "results.json").read_text())["results"]

    merged = peft_model.merge_and_unload().eval()
    reference = simple_evaluate(
        model=HFLM(pretrained=merged, tokenizer=AutoTokenizer.from_pretrained(ckpt), batch_size=4, max_length=MAX_LEN),
        tasks=tasks, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), bootstrap_iters=0,
    )["results"]
    for task in tasks:
        for key, value in reference[task].items():
            if isinstance(value, float):
                assert ours[task][key] == pytest.approx(value, abs=1e-4), (task, key)
    assert (tmp_path / "out" / "torchft_config.yaml").is_file()


def test_zero_adapter_stops_the_run(checkpoint, tmp_path):
    from torchft._recipes.eleuther_eval import main
    from torchft.config import load_config

    ckpt, hf_model = checkpoint
    _save_adapter(hf_model, tmp_path / "adapter", trained=False)
    cfg = load_config("eleuther_evaluation", _overrides(ckpt, tmp_path / "out", f"adapter_dir={tmp_path / 'adapter'}",
                                                        "tasks=[torchft_tiny_mc]"))
    with pytest.raises(ValueError, match="adapter has no effect"):
        main(cfg)
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_task_is_one_line_on_the_cli(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    proc = subprocess.run(
        [sys.executable, "-m", "torchft.cli.main", "run", "eleuther_eval", "--config", "eleuther_evaluation",
         *_overrides(ckpt, tmp_path / "out", "tasks=[torchft_tiny_mcc]")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "tune: error: unknown lm-eval task 'torchft_tiny_mcc' (close names: torchft_tiny_mc"
    ), proc.stderr


def test_add_bos_from_the_config_on_a_model_whose_tokenizer_adds_none(tmp_path):
    """Default: no BOS, like the model's tokenizer (and lm-eval's HF backend); add_bos=true puts it first."""
    import torch

    from torchft._recipes.eleuther_eval import main
    from torchft.config import load_config
    from torchft.data.tokenizers import hf_tokenizer
    from torchft.eval import evaluate
    from torchft.generation import load_model

    ckpt, _ = save_tiny_checkpoint(tmp_path / "ckpt", seed=5, tokenizer_adds_bos=False)
    scores = {}
    for add_bos in ("null", "true"):
        main(load_config("eleuther_evaluation", _overrides(ckpt, tmp_path / add_bos, "tasks=[torchft_tiny_mc]",
                                                           f"add_bos={add_bos}", "log_samples=true")))
        rows = [json.loads(line) for line in (tmp_path / add_bos / "samples_torchft_tiny_mc.jsonl").open()]
        scores[add_bos] = [r[0] for row in rows for r in row["filtered_resps"]]
    forced = evaluate(load_model(ckpt, dtype=torch.float32), hf_tokenizer(str(ckpt)), ["torchft_tiny_mc"],
                      include_path=TASKS_DIR, include_defaults=False, max_seq_len=MAX_LEN, batch_size=4,
                      add_bos=True, log_samples=True)
    assert scores["true"] == [r[0] for s in forced["samples"]["torchft_tiny_mc"] for r in s["filtered_resps"]]
    assert scores["null"] != pytest.approx(scores["true"], abs=1e-3)


def test_cli_run_prints_no_known_dependency_noise(checkpoint, tmp_path):
    # Run outside any git repository (lm-eval asks git for a commit) on a CPU machine (torchao's CUDA
    # kernels do not load): none of those dependencies' lines reach the user.
    ckpt, _ = checkpoint
    repo = str(Path(__file__).parents[2])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": repo, "TUNE_DEBUG": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "torchft.cli.main", "run", "eleuther_eval", "--config", "eleuther_evaluation",
         *_overrides(ckpt, tmp_path / "out", "tasks=[torchft_tiny_mc]", "limit=2")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    for noise in ("fatal: not a git repository", "Failed to load", "register_constant() on Enum subclasses"):
        assert noise not in proc.stderr, proc.stderr
