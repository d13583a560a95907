"""`tune run generate`: greedy text equals transformers' on the same checkpoint; clear CLI errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "assets"))
from tiny_llama_pair import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=4)


def _overrides(folder, *extra):
    return [
        f"checkpoint_dir={folder}", "device=cpu", "dtype=fp32", "temperature=0", "max_new_tokens=12", *extra,
    ]


def _hf_text(hf_model, folder, ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_text_matches_transformers(checkpoint, chat, capsys):
    from transformers import AutoTokenizer

    from torchft.config import load_config
    from torchft._recipes.generate import main

    folder, hf_model = checkpoint
    prompt = "the old cat sleeps on the"
    main(load_config("generation", _overrides(folder, f"prompt='{prompt}'", f"chat={str(chat).lower()}")))
    printed = capsys.readouterr().out.strip()
    tok = AutoTokenizer.from_pretrained(folder)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        ids = ids if isinstance(ids[0], int) else ids[0]
    else:
        ids = tok.encode(prompt)
    assert printed == _hf_text(hf_model, folder, list(ids))
    assert printed  # something was generated


@pytest.mark.parametrize(
    "extra, message",
    [
        (["prompt=''"], "prompt is empty"),
        (["max_new_tokens=0"], r"max_new_tokens \(0\) must be > 0"),
    ],
)
def test_cli_errors_are_one_line(checkpoint, extra, message):
    folder, _ = checkpoint
    overrides = [o for o in _overrides(folder) if not o.startswith("max_new_tokens")] + extra
    if "max_new_tokens=0" not in extra:
        overrides.append("max_new_tokens=4")
    proc = subprocess.run(
        [sys.executable, "-m", "torchft.cli.main", "run", "generate", "--config", "generation", *overrides],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    import re
    assert re.search(message, last), proc.stderr


def test_checkpoint_dir_alone_with_meta_tokenizer_file(tmp_path, capsys):
    """A folder whose only tokenizer is Meta's original/tokenizer.model (tiktoken): the config derives the
    tokenizer from checkpoint_dir and the chat prompt is the Llama 3 format; text equals transformers'."""
    from torchft._recipes.generate import main
    from torchft.config import load_config
    from torchft.data.tokenizers import llama3_tokenizer, train_llama3_ranks

    from tiny_llama_pair import make_pair

    (tmp_path / "original").mkdir()
    ranks = str(tmp_path / "original" / "tokenizer.model")
    train_llama3_ranks(["the old cat sleeps on the mat and the dog runs"] * 20, num_merges=40, path=ranks)
    tokenizer = llama3_tokenizer(ranks)
    hf_model, _ = make_pair(seed=9, vocab_size=tokenizer.vocab_size)
    hf_model.save_pretrained(tmp_path)
    prompt = "the old cat sleeps on the"
    main(load_config("generation", [f"checkpoint_dir={tmp_path}", "device=cpu", "dtype=fp32", "temperature=0",
                                    "max_new_tokens=12", f"prompt='{prompt}'"]))
    ids = tokenizer.tokenize_messages([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.stop_tokens)
    assert capsys.readouterr().out.strip() == tokenizer.decode(out[0, len(ids):].tolist())


def test_generate_reproduces_the_training_runs_sample(checkpoint, capsys):
    # A training run prints greedy samples of its config's sample_prompts (blank line included);
    # `tune run generate prompt=<the same text>` on the saved folder gives the same completion.
    from torchft.config import load_config
    from torchft._recipes.generate import main
    from torchft.data.tokenizers import model_tokenizer
    from torchft.generation import load_model
    from torchft.training.samples import generate_samples

    folder, _ = checkpoint
    prompt = "Task: add the two numbers.\n\n3 + 4"
    model = load_model(folder, device="cpu", dtype=torch.float32)
    (expected,) = generate_samples(model, model_tokenizer(folder), [prompt], max_new_tokens=12)
    main(load_config("generation", _overrides(folder, f"prompt={prompt}")))
    assert capsys.readouterr().out.strip() == expected
