"""Tiny tokenizer files made in the test session: a Llama-3-format ranks file and a sentencepiece model."""
import io
import random

import pytest

WORDS = "the a cat dog sat on mat sun rain hello world what is capital france paris you are helpful assistant".split()


def corpus(n_lines=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(line.capitalize() + rng.choice([".", "!", "?", "'s", " 42.", ":\n"]))
    return lines


@pytest.fixture(scope="session")
def llama3_ranks_path(tmp_path_factory):
    from torchft.data.tokenizers.bpe import train_llama3_ranks

    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    train_llama3_ranks(corpus(), num_merges=150, path=str(path))
    return str(path)


@pytest.fixture(scope="session")
def llama3_tok(llama3_ranks_path):
    from torchft.data import llama3_tokenizer

    return llama3_tokenizer(llama3_ranks_path)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    import sentencepiece as spm

    model = io.BytesIO()
    # Like Llama 2's model: BPE, byte fallback, whitespace kept as written, digits split.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(600, seed=1) + ["[INST] <<SYS>>\n<</SYS>>\n\n[/INST]"] * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("llama2") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="session")
def llama2_tok(sp_model_path):
    from torchft.data import llama2_tokenizer

    return llama2_tokenizer(sp_model_path)
