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
        f"checkpoint_dir={folder}", "tokenizer._component_=torchft.data.tokenizers.hf_tokenizer", "~tokenizer.path",
        f"+tokenizer.model_dir={folder}", "device=cpu", "dtype=fp32", "temperature=0", "max_new_tokens=12", *extra,
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
