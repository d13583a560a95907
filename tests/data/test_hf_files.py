"""Folders with Meta's tokenizer.model get tokenizer.json + tokenizer_config.json: transformers' tokenizer from
such a folder encodes a corpus and formats chats exactly as torchft's tokenizer does."""
import json
import logging
import shutil

import pytest

from torchft.checkpoint._io import copy_support_files
from torchft.data import llama2_tokenizer, llama3_tokenizer
from torchft.data.tokenizers import model_tokenizer

from .conftest import corpus

TEXTS = corpus(40, seed=5) + [
    "héllo wörld ñ 日本語 🦙!", "a   b\t\tc\n\n\n d  ", "  leading", "trailing   ", "12345 6789 3.14159",
    "It's they'll we've I'm HE'S", "", " ", "\n", "tab\there", "mixed 123abc456 def",
]
# Special-token strings a user typed: text, not control tokens, for torchft.
TYPED = ["x<|eot_id|>y <|begin_of_text|>", "<s> </s> [INST] hi [/INST]", "<|start_header_id|>system<|end_header_id|>"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2? "},
    {"role": "assistant", "content": " It is 4."},
    {"role": "user", "content": "And  3+3?"},
]


@pytest.fixture(params=["llama3", "llama2"])
def step_folder(request, tmp_path, llama3_ranks_path, sp_model_path):
    """A step folder made from an input folder holding only Meta's tokenizer.model."""
    source = tmp_path / "input"
    source.mkdir()
    path, build = (llama3_ranks_path, llama3_tokenizer) if request.param == "llama3" else (sp_model_path, llama2_tokenizer)
    shutil.copy(path, source / "tokenizer.model")
    step = tmp_path / "step_1"
    step.mkdir()
    written = copy_support_files(source, step)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(written)
    return step, build(path)


def test_transformers_encodes_as_torchft(step_folder):
    from transformers import AutoTokenizer

    step, ours = step_folder
    reference = AutoTokenizer.from_pretrained(step)
    assert len(reference) == ours.vocab_size
    assert (reference.bos_token_id, reference.eos_token_id) == (ours.bos_id, ours.eos_id)
    for text in TEXTS:
        ids = ours.encode(text, add_eos=False)
        assert reference.encode(text) == ids, text
        assert reference.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    for text in TEXTS + TYPED:  # typed special-token strings: text when split_special_tokens=True
        assert reference.encode(text, split_special_tokens=True) == ours.encode(text, add_eos=False), text


def test_chat_template_gives_torchft_ids(step_folder):
    from transformers import AutoTokenizer

    step, ours = step_folder
    reference = AutoTokenizer.from_pretrained(step)
    for chat in (CHAT, CHAT[1:3]):
        for prompt in (False, True):
            ids = reference.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True, return_dict=False)
            assert list(ids) == ours.tokenize_messages(chat, add_generation_prompt=prompt)[0]
    # torchft reads the folder through tokenizer.json now: same ids, masks and stop tokens.
    from_folder = model_tokenizer(str(step))
    chat = [dict(m, masked=m["role"] != "assistant") for m in CHAT[:3]]
    assert from_folder.tokenize_messages(chat) == ours.tokenize_messages(chat)
    assert sorted(from_folder.stop_tokens) == sorted(ours.stop_tokens)
    assert json.loads((step / "generation_config.json").read_text())["eos_token_id"] == ours.stop_tokens


def test_an_unreadable_tokenizer_model_is_one_warning(tmp_path, caplog):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "tokenizer.model").write_bytes(b"\x00 not a tokenizer")
    (tmp_path / "step").mkdir()
    with caplog.at_level(logging.WARNING):
        assert copy_support_files(tmp_path / "input", tmp_path / "step") == ["tokenizer.model"]
    assert "tokenizer.model: no tokenizer.json written (" in caplog.text
    assert not (tmp_path / "step" / "tokenizer.json").exists()


def test_each_save_of_a_run_converts_the_tokenizer_once(tmp_path, llama3_ranks_path, monkeypatch):
    """Every save copies the same tokenizer.model: the conversion (slow for a real vocabulary) runs once,
    and each step folder still gets the same files."""
    from torchft.data.tokenizers import hf_files

    monkeypatch.setattr(hf_files, "_CONVERTED", {})
    calls = []
    convert = hf_files.hf_tokenizer_files
    monkeypatch.setattr(hf_files, "hf_tokenizer_files", lambda tok: calls.append(tok) or convert(tok))
    source = tmp_path / "input"
    source.mkdir()
    shutil.copy(llama3_ranks_path, source / "tokenizer.model")
    steps = [tmp_path / f"step_{n}" for n in (1, 2)]
    for step in steps:
        step.mkdir()
        assert "tokenizer.json" in copy_support_files(source, step)
    assert len(calls) == 1
    assert (steps[0] / "tokenizer.json").read_text() == (steps[1] / "tokenizer.json").read_text()
