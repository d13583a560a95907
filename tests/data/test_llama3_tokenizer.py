"""Llama 3 tokenizer: ranks file, special-token ids, chat format byte for byte, parity with transformers."""
import base64
import itertools
import json

import pytest
import tiktoken

from torchft.data import Message, hf_tokenizer, llama3_tokenizer
from torchft.data.tokenizers.llama3 import LLAMA3_PATTERN, SPECIAL_TOKENS

from .conftest import corpus

# The Llama 3 prompt format as published on its model card (system, user, assistant).
MODEL_CARD_CHAT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful AI assistant for travel tips and recommendations<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "What is France's capital?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "Bonjour! The capital of France is Paris!<|eot_id|>"
)
CHAT = [
    Message("system", "You are a helpful AI assistant for travel tips and recommendations", masked=True),
    Message("user", "What is France's capital?", masked=True),
    Message("assistant", "Bonjour! The capital of France is Paris!"),
]

# A Llama-3-style chat template for the HF tokenizer.json route.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_meta_special_token_ids_for_a_128000_rank_file(tmp_path):
    # 256 single bytes, then distinct 2- and 3-byte strings up to 128000 ranks, as in Meta's file.
    tokens = [bytes([b]) for b in range(256)]
    pairs = (bytes(p) for n in (2, 3) for p in itertools.product(range(256), repeat=n))
    tokens += list(itertools.islice((t for t in pairs), 128000 - 256))
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    tok = llama3_tokenizer(str(path))
    ids = tok.special_tokens
    assert (ids["<|begin_of_text|>"], ids["<|end_of_text|>"]) == (128000, 128001)
    assert (ids["<|start_header_id|>"], ids["<|end_header_id|>"]) == (128006, 128007)
    assert (ids["<|eom_id|>"], ids["<|eot_id|>"], ids["<|python_tag|>"]) == (128008, 128009, 128010)
    assert ids["<|finetune_right_pad_id|>"] == 128004 and ids["<|reserved_special_token_247|>"] == 128255
    assert tok.vocab_size == 128256 and len(SPECIAL_TOKENS) == 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert tok.stop_tokens == [128009, 128001]


def test_encode_matches_tiktoken_and_owns_bos_eos(llama3_tok, llama3_ranks_path):
    from tiktoken.load import load_tiktoken_bpe

    reference = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(llama3_ranks_path),
                                  special_tokens={})
    text = "Hello world, what's the capital?\n\n  The sun 12345 héllo"
    ids = llama3_tok.encode(text)
    assert ids == [llama3_tok.bos_id, *reference.encode_ordinary(text), llama3_tok.eos_id]
    assert llama3_tok.encode(text, add_bos=False, add_eos=False) == reference.encode_ordinary(text)
    assert llama3_tok.decode(ids) == text
    assert llama3_tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text + "<|end_of_text|>"
    # Special-token text inside user content stays text: no injected control tokens, never two BOS.
    injected = llama3_tok.encode("<|begin_of_text|><|eot_id|>hi")
    assert injected.count(llama3_tok.bos_id) == 1 and llama3_tok.eot_id not in injected
    assert llama3_tok.encode_batch([text, "cat"]) == [ids, llama3_tok.encode("cat")]


def test_long_whitespace_runs_encode(llama3_tok):
    text = "a" + " " * 60_000 + "b" + "x" * 30_000
    assert llama3_tok.decode(llama3_tok.encode(text)) == text


def test_chat_format_matches_model_card(llama3_tok):
    tokens, mask = llama3_tok.tokenize_messages(CHAT)
    assert llama3_tok.decode(tokens, skip_special_tokens=False) == MODEL_CARD_CHAT
    assert tokens == llama3_tok.tt_model.encode(MODEL_CARD_CHAT, allowed_special="all")
    assert tokens.count(llama3_tok.bos_id) == 1
    # Masked: BOS, system and user turns; trained: the assistant turn including its header and <|eot_id|>.
    answer_start = len(llama3_tok.tt_model.encode(MODEL_CARD_CHAT.split("<|start_header_id|>assistant")[0],
                                                  allowed_special="all"))
    assert mask == [True] * answer_start + [False] * (len(tokens) - answer_start)
    assert tokens[-1] == llama3_tok.eot_id


def test_generation_prompt_and_open_turn(llama3_tok):
    prompt, _ = llama3_tok.tokenize_messages(CHAT[:2], add_generation_prompt=True)
    expected = MODEL_CARD_CHAT.split("Bonjour")[0]
    assert llama3_tok.decode(prompt, skip_special_tokens=False) == expected
    open_turn, _ = llama3_tok.tokenize_messages(CHAT, add_eos=False)
    assert llama3_tok.decode(open_turn, skip_special_tokens=False) == MODEL_CARD_CHAT[: -len("<|eot_id|>")]


def test_max_seq_len_truncates(llama3_ranks_path):
    tok = llama3_tokenizer(llama3_ranks_path, max_seq_len=10)
    tokens, mask = tok.tokenize_messages(CHAT)
    assert len(tokens) == len(mask) == 10
    full, _ = tok.tokenize_messages(CHAT, truncate=False)
    assert full[:10] == tokens and len(full) > 10


def test_wrong_file_kinds(tmp_path, sp_model_path):
    with pytest.raises(ValueError, match=r"tokenizer.model:\d+: not a Llama 3 tiktoken ranks file.*sentencepiece model: load it with llama2_tokenizer"):
        llama3_tokenizer(sp_model_path)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        llama3_tokenizer(str(tmp_path / "missing.model"))
    gaps = tmp_path / "gaps.model"
    gaps.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(ValueError, match="ranks must be 0..1 without gaps"):
        llama3_tokenizer(str(gaps))


def test_parity_with_transformers_tiktoken_conversion_and_hf_route(tmp_path, llama3_tok, llama3_ranks_path):
    """transformers converts the same ranks file to a tokenizer.json: the ids must agree, and the HF
    route (hf_tokenizer with a Llama 3 chat template) must give the same chat tokens and mask."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=llama3_ranks_path, extra_special_tokens=SPECIAL_TOKENS).converted()
    for text in corpus(50, seed=7) + ["  spaces\n\n\nnewlines\t tabs", "naïve café 2024!!"]:
        assert converted.encode(text, add_special_tokens=False).ids == llama3_tok.encode(text, False, False)

    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    converted.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [llama3_tok.eos_id, llama3_tok.eot_id]}))
    hf = hf_tokenizer(str(model_dir))
    tokens, mask = hf.tokenize_messages(CHAT)
    assert (tokens, mask) == llama3_tok.tokenize_messages(CHAT)
    assert hf.stop_tokens == [llama3_tok.eot_id, llama3_tok.eos_id]
    # The converted tokenizer.json has no post-processor, so it adds no BOS; EOS is the config's eos_token.
    assert not hf.adds_bos
    assert hf.encode("hi there") == llama3_tok.encode("hi there", add_bos=False, add_eos=False) + [llama3_tok.eot_id]

    reference = AutoTokenizer.from_pretrained(str(model_dir))
    dicts = [{"role": m.role, "content": m.content} for m in CHAT]
    ref_ids = reference.apply_chat_template(dicts, tokenize=True)
    ref_ids = ref_ids["input_ids"] if not isinstance(ref_ids, list) else ref_ids
    assert tokens == ref_ids
    prompt = reference.apply_chat_template(dicts[:2], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    assert hf.tokenize_messages(CHAT[:2], add_generation_prompt=True)[0] == prompt
    assert hf.tokenize_messages(CHAT, add_eos=False)[0] == llama3_tok.tokenize_messages(CHAT, add_eos=False)[0]


def test_hf_route_reads_chat_template_jinja_and_reports_a_missing_template(tmp_path, llama3_ranks_path, llama3_tok):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=llama3_ranks_path, extra_special_tokens=SPECIAL_TOKENS).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    with pytest.raises(ValueError, match="no chat template \\(neither chat_template in tokenizer_config.json nor chat_template.jinja\\)"):
        hf_tokenizer(str(tmp_path)).tokenize_messages(CHAT)
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    assert hf_tokenizer(str(tmp_path)).tokenize_messages(CHAT) == llama3_tok.tokenize_messages(CHAT)


# Like Llama 3.1's template: a system block is always written, the system message's text goes inside it.
DEFAULT_SYSTEM_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}<|eot_id|>"
    "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
)


def test_hf_route_with_a_template_that_writes_a_default_system_block(tmp_path, llama3_ranks_path, llama3_tok):
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=llama3_ranks_path, extra_special_tokens=SPECIAL_TOKENS).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": DEFAULT_SYSTEM_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    hf = hf_tokenizer(str(tmp_path))
    for chat in (CHAT, CHAT[1:]):
        tokens, mask = hf.tokenize_messages(chat)
        reference = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
            [{"role": m.role, "content": m.content} for m in chat], tokenize=True)
        assert tokens == (reference if isinstance(reference, list) else reference["input_ids"])
        trained = [t for t, m in zip(tokens, mask) if not m]
        assert hf.decode(trained, skip_special_tokens=False) == (
            "<|start_header_id|>assistant<|end_header_id|>\n\nBonjour! The capital of France is Paris!<|eot_id|>")


def test_hf_route_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        hf_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a tokenizers JSON file \(.*\); replace it with the "
                                         r"model's own tokenizer.json \(download or copy it again\)$"):
        hf_tokenizer(str(tmp_path))


def test_numpy_batch_path_matches_encode(llama3_tok):
    texts = ["Hello world!", "", "x" * 30_000 + " the cat", "What's <|eot_id|> 42?"]
    arrays = llama3_tok.encode_batch_numpy(texts)
    assert [a.tolist() for a in arrays] == llama3_tok.encode_batch(texts)
    assert [a.tolist() for a in llama3_tok.encode_batch_numpy(texts, add_bos=False, add_eos=False)] == [
        llama3_tok.encode(t, add_bos=False, add_eos=False) for t in texts]


# Meta's chat template of Meta-Llama-3-8B-Instruct (tokenizer_config.json), verbatim.
OFFICIAL_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("turns", [1, 2])
def test_generation_prompt_equals_the_official_template(tmp_path, llama3_tok, llama3_ranks_path, turns):
    """The prompt generation and the recipes' samples feed, byte for byte the official template's
    add_generation_prompt rendering (as transformers renders it)."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from torchft.generation import encode_prompt

    converted = TikTokenConverter(vocab_file=llama3_ranks_path, extra_special_tokens=SPECIAL_TOKENS).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": OFFICIAL_LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    chat = [{"role": m.role, "content": m.content} for m in CHAT[: 2 * turns]][:-1]  # ends with a user turn
    text = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    expected = llama3_tok.tt_model.encode(text, allowed_special="all")
    assert encode_prompt(llama3_tok, chat) == expected
    # As the fine-tuning recipes' before/after samples call it.
    assert llama3_tok.tokenize_messages(chat, add_eos=False, add_generation_prompt=True)[0] == expected
    assert llama3_tok.decode(expected, skip_special_tokens=False).endswith(
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_typed_special_tokens_stay_text_in_chats(llama3_tok):
    tokens, _ = llama3_tok.tokenize_messages([Message("user", "a <|eot_id|> b <|begin_of_text|>")])
    assert tokens.count(llama3_tok.eot_id) == 1 and tokens.count(llama3_tok.bos_id) == 1
    assert not set(llama3_tok.encode("<|eot_id|>", False, False)) & set(llama3_tok.special_tokens.values())
