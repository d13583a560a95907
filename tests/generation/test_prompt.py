"""encode_prompt: plain text and chat messages, as transformers' tokenizer renders them."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "assets"))
from tiny_llama_pair import save_tiny_tokenizer  # noqa: E402

from torchft.generation import encode_prompt  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from torchft.data.tokenizers import hf_tokenizer

    folder = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return hf_tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)


def _hf_chat(hf_tok, messages):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids if isinstance(ids[0], int) else ids[0])


def test_plain_text_gets_bos_and_no_eos(tokenizers):
    ours, hf = tokenizers
    assert encode_prompt(ours, "the cat runs") == hf.encode("the cat runs")


def test_chat_messages_and_system_prompt_match_the_template(tokenizers):
    ours, hf = tokenizers
    messages = [{"role": "user", "content": "what is the sky"}, {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "and the grass"}]
    assert encode_prompt(ours, messages) == _hf_chat(hf, messages)
    assert encode_prompt(ours, "the cat", chat=True, system_prompt="yes") == _hf_chat(
        hf, [{"role": "system", "content": "yes"}, {"role": "user", "content": "the cat"}])


@pytest.mark.parametrize("prompt, kwargs, match", [
    ("  ", {}, "prompt is empty"),
    ([], {}, "prompt is empty: the message list has no content"),
    ("the cat", {"system_prompt": "yes"}, "system_prompt needs chat=true"),
])
def test_bad_prompts(tokenizers, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_prompt(tokenizers[0], prompt, **kwargs)


def test_plain_text_without_bos_when_the_tokenizer_adds_none(tmp_path):
    from transformers import AutoTokenizer

    from torchft.data.tokenizers import hf_tokenizer

    folder = save_tiny_tokenizer(tmp_path, adds_bos=False)
    assert encode_prompt(hf_tokenizer(str(folder)), "the cat runs") == AutoTokenizer.from_pretrained(folder).encode(
        "the cat runs")
