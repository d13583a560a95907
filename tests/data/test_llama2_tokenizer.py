"""Llama 2 tokenizer: sentencepiece, and the [INST] chat format exactly as Meta's reference builds it."""
import pytest

from torchft.data import Message, llama2_tokenizer

# Published Llama 2 chat layout: system folded into the first user turn, one <s>...</s> block per exchange.
MODEL_CARD_CHAT = (
    "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST] "
    "Paris is the capital. </s><s>[INST] And the sun? [/INST]"
)
CHAT = [
    Message("system", "You are a helpful assistant.", masked=True),
    Message("user", "What is the capital of France?", masked=True),
    Message("assistant", "Paris is the capital."),
    Message("user", "And the sun?", masked=True),
]


def test_encode_owns_bos_eos(llama2_tok):
    sp = llama2_tok.sp_model
    ids = llama2_tok.encode("Hello world")
    assert ids == [sp.bos_id(), *sp.encode("Hello world"), sp.eos_id()]
    assert llama2_tok.encode("Hello world", add_bos=False, add_eos=False) == sp.encode("Hello world")
    assert llama2_tok.decode(ids) == "Hello world"
    assert llama2_tok.encode_batch(["Hello world", "cat"]) == [ids, llama2_tok.encode("cat")]
    assert (llama2_tok.bos_id, llama2_tok.eos_id, llama2_tok.pad_id, llama2_tok.stop_tokens) == (1, 2, 0, [2])


def test_chat_format_matches_the_published_layout(llama2_tok):
    tokens, mask = llama2_tok.tokenize_messages(CHAT)
    assert llama2_tok.decode(tokens, skip_special_tokens=False) == MODEL_CARD_CHAT
    # Meta's reference: each exchange "[INST] {user} [/INST] {answer} " encoded whole, between BOS and EOS.
    sp = llama2_tok.sp_model
    first = "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris is the capital. "
    expected = [1, *sp.encode(first), 2, 1, *sp.encode("[INST] And the sun? [/INST]")]
    assert tokens == expected
    answer = sp.encode("Paris is the capital. ") + [2]
    prompt_len = 1 + len(sp.encode(first)) - len(answer) + 1
    assert mask == [True] * prompt_len + [False] * len(answer) + [True] * (len(tokens) - prompt_len - len(answer))


def test_roles_must_alternate(llama2_tok):
    with pytest.raises(ValueError, match="message 2 has role 'user' where 'assistant' is expected"):
        llama2_tok.tokenize_messages([Message("system", "s"), Message("user", "a"), Message("user", "b")])
    with pytest.raises(ValueError, match="message role 'robot' is not one of"):
        Message("robot", "hi")


def test_wrong_file_kinds(tmp_path, llama3_ranks_path):
    with pytest.raises(ValueError, match="not a sentencepiece model.*Llama 3 tiktoken ranks file: load it with llama3_tokenizer"):
        llama2_tokenizer(llama3_ranks_path)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        llama2_tokenizer(str(tmp_path / "nope.model"))


def test_typed_control_strings_stay_text(llama2_tok):
    ids = llama2_tok.encode("a </s> b <s> c", add_bos=False, add_eos=False)
    assert llama2_tok.bos_id not in ids and llama2_tok.eos_id not in ids
    tokens, _ = llama2_tok.tokenize_messages([Message("user", "hi </s><s>"), Message("assistant", "ok </s>")])
    assert tokens.count(llama2_tok.bos_id) == 1 and tokens.count(llama2_tok.eos_id) == 1
