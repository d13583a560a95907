"""Preference pairs: chat formatting, prompt masking, the truncation policy and the collate."""
import json
import logging

import pytest

from torchft.data import quickstart_tokenizer
from torchft.data.collate import IGNORE_INDEX
from torchft.data.preference import preference_collate, preference_dataset, truncate_pair


@pytest.fixture(scope="module")
def tok():
    return quickstart_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_and_chat_rows_mask_the_prompt_and_collate_chosen_first(tmp_path, tok):
    text = [{"prompt": "Add the two numbers.\n\n3 + 4", "chosen": "7", "rejected": "8"}]
    chat = [{"prompt": [{"role": "user", "content": "Add the two numbers.\n\n3 + 4"}],
             "chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]}]
    ds = preference_dataset(tok, "json", data_files=str(_write(tmp_path / "t.jsonl", text)))
    chat_ds = preference_dataset(tok, "json", data_files=str(_write(tmp_path / "c.jsonl", chat)))
    assert chat_ds[0] == ds[0]  # text is a user turn / an assistant turn
    sample = ds[0]
    trained = [t for t, l in zip(sample["chosen_tokens"], sample["chosen_labels"]) if l != IGNORE_INDEX]
    assert tok.decode(trained).strip() == "7"  # the answer only: prompt and assistant header masked
    batch = preference_collate([ds[0], chat_ds[0]], pad_id=tok.pad_id)
    assert batch["tokens"].shape[0] == 4 and batch["num_pairs"] == 2
    assert batch["tokens"][0, :len(sample["chosen_tokens"])].tolist() == sample["chosen_tokens"]
    assert batch["tokens"][2, :len(sample["rejected_tokens"])].tolist() == sample["rejected_tokens"]


def test_truncation_keeps_prompt_end_and_answer_start():
    prompt, answers = truncate_pair(list(range(10)), {"chosen": [50, 51, 52], "rejected": [60]}, 8, max_prompt_len=6)
    assert prompt == [4, 5, 6, 7, 8, 9] and answers == {"chosen": [50, 51], "rejected": [60]}
    assert truncate_pair(list(range(10)), {"chosen": [1]}, 10) is None  # no room for an answer token


def test_a_pair_whose_prompt_is_too_long_is_skipped_and_counted(tmp_path, tok, caplog):
    rows = [{"prompt": "apple " * 40, "chosen": "A", "rejected": "B"},
            {"prompt": "Add the two numbers.\n\n1 + 1", "chosen": "2", "rejected": "3"}]
    with caplog.at_level(logging.WARNING, logger="torchft.data"):
        ds = preference_dataset(tok, "json", data_files=str(_write(tmp_path / "p.jsonl", rows)), max_seq_len=24)
    assert len(ds) == 1 and ds.stats["skipped_long_prompt"] == 1
    assert sum("skipped 1 of 2 pairs" in r.message for r in caplog.records) == 1


def test_a_missing_column_names_it_and_the_mapping(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"column 'prompt' not found.*column_map=\{'prompt'"):
        preference_dataset(tok, "json", data_files=str(path))
    assert len(preference_dataset(tok, "json", data_files=str(path), column_map={"prompt": "question"})) == 1
