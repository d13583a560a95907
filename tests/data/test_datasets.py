"""Dataset builders: sources, column maps, masking, length policy with counts, clear errors."""
import json
import logging

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest

from torchft.data import (
    Message,
    alpaca_dataset,
    assets_path,
    chat_dataset,
    instruct_dataset,
    quickstart_dataset,
    quickstart_tokenizer,
    text_completion_dataset,
)
from torchft.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_instruct(tok, row, train_on_input=False, template=None):
    from torchft.data.templates import render_instruct

    user = render_instruct(template, row["instruction"], row["input"])
    tokens, mask = tok.tokenize_messages(
        [Message("user", user, masked=not train_on_input), Message("assistant", row["output"])]
    )
    return tokens, [-100 if m else t for t, m in zip(tokens, mask)]


def test_instruct_jsonl_masks_the_prompt(tmp_path, llama3_tok):
    ds = instruct_dataset(tokenizer=llama3_tok, source="json", data_files=write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert len(ds) == 3
    for i, row in enumerate(ROWS):
        tokens, labels = expected_instruct(llama3_tok, row)
        assert ds[i] == {"tokens": tokens, "labels": labels}
    # Only the answer and its <|eot_id|> (plus the assistant header) are trained on.
    trained = [t for t, l in zip(ds[0]["tokens"], ds[0]["labels"]) if l != -100]
    assert llama3_tok.decode(trained, skip_special_tokens=False).endswith("\n\n5<|eot_id|>")

    on_input = instruct_dataset(llama3_tok, source="json", data_files=str(tmp_path / "d.jsonl"), train_on_input=True)
    assert on_input[0]["labels"] == [-100] + on_input[0]["tokens"][1:]


def test_same_rows_from_every_file_format(tmp_path, llama3_tok):
    reference = instruct_dataset(llama3_tok, source="json", data_files=write_jsonl(tmp_path / "d.jsonl", ROWS))
    table = pa.Table.from_pylist(ROWS)
    pa.parquet.write_table(table, tmp_path / "d.parquet")
    pa.csv.write_csv(table, tmp_path / "d.csv")
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    for source, path in [("parquet", "d.parquet"), ("csv", "d.csv"), ("json", "d.json"), (str(tmp_path / "d.parquet"), None)]:
        ds = instruct_dataset(llama3_tok, source=source, data_files=str(tmp_path / path) if path else None)
        assert [ds[i] for i in range(3)] == [reference[i] for i in range(3)], source


def test_column_map_and_alpaca_by_name(tmp_path, llama3_tok):
    rows = [{"prompt": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ROWS]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    ds = instruct_dataset(llama3_tok, "json", path, column_map={"instruction": "prompt", "input": "context", "output": "answer"},
                          template="alpaca")
    for i, row in enumerate(ROWS):
        assert ds[i]["tokens"] == expected_instruct(llama3_tok, row, template="alpaca")[0]

    # The classic alpaca dataset's code path, on a local file with its columns.
    alpaca = alpaca_dataset(llama3_tok, source="json", data_files=write_jsonl(tmp_path / "alpaca.jsonl", ROWS))
    text = llama3_tok.decode(alpaca[0]["tokens"])
    assert ALPACA_WITH_INPUT.format(instruction="Add the numbers.", input="2 + 3").strip() in text
    assert ALPACA_NO_INPUT.format(instruction="Say hello.").strip() in llama3_tok.decode(alpaca[1]["tokens"])


def test_missing_column_names_it_and_lists_the_present_ones(tmp_path, llama3_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(ValueError, match=r"column 'output' not found; columns present: instruction, answer"):
        instruct_dataset(llama3_tok, "json", path)
    with pytest.raises(ValueError, match=r"no 'conversations' \(sharegpt\) or 'messages' \(openai\) column; columns present: instruction, answer"):
        chat_dataset(llama3_tok, "json", path)


def test_bad_files(tmp_path, llama3_tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        instruct_dataset(llama3_tok, "json", str(empty))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON line"):
        instruct_dataset(llama3_tok, "json", str(bad))

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"good line\ncaf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 13 \(line 2\)"):
        text_completion_dataset(llama3_tok, "text", str(latin1))

    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        instruct_dataset(llama3_tok, "json", str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="source='json' reads local files: set data_files"):
        instruct_dataset(llama3_tok, "json")


def test_long_samples_truncated_or_dropped_with_counts(tmp_path, llama3_tok, caplog):
    rows = ROWS + [{"instruction": "Repeat.", "input": "", "output": "the cat sat " * 40}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full = instruct_dataset(llama3_tok, "json", path)
    limit = max(len(full[i]["tokens"]) for i in range(3))
    with caplog.at_level(logging.WARNING, logger="torchft.data"):
        truncated = instruct_dataset(llama3_tok, "json", path, max_seq_len=limit)
    assert len(truncated) == 4 and truncated.stats["truncated"] == 1
    assert truncated[3]["tokens"] == full[3]["tokens"][:limit]
    assert "truncated 1 of 4 samples to max_seq_len" in caplog.text

    dropped = instruct_dataset(llama3_tok, "json", path, max_seq_len=limit, long_samples="drop")
    assert len(dropped) == 3 and dropped.stats["dropped_too_long"] == 1
    assert "dropped 1 of 4 samples longer than max_seq_len" in caplog.text

    # Cut before the answer: nothing left to train on, so every sample is dropped, and that is an error.
    with pytest.raises(ValueError, match=r"no samples left out of 4 rows \(0 longer than max_seq_len, 4 with nothing to train on"):
        instruct_dataset(llama3_tok, "json", path, max_seq_len=8)
    with pytest.raises(ValueError, match=r"no samples left out of 4 rows \(4 longer than max_seq_len"):
        instruct_dataset(llama3_tok, "json", path, max_seq_len=8, long_samples="drop")
    with pytest.raises(ValueError, match="long_samples must be 'truncate' or 'drop'"):
        instruct_dataset(llama3_tok, "json", path, long_samples="split")


CONVERSATION = [
    ("system", "You are helpful."),
    ("user", "What is the capital of France?"),
    ("assistant", "Paris."),
    ("user", "And the sun?"),
    ("assistant", "A star!"),
]


def test_chat_sharegpt_and_openai_shapes(tmp_path, llama3_tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": names[r], "value": c} for r, c in CONVERSATION]}])
    openai = write_jsonl(tmp_path / "oa.jsonl", [{"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}])
    tokens, mask = llama3_tok.tokenize_messages([Message(r, c, masked=r != "assistant") for r, c in CONVERSATION])
    expected = {"tokens": tokens, "labels": [-100 if m else t for t, m in zip(tokens, mask)]}
    assert chat_dataset(llama3_tok, "json", sharegpt)[0] == expected
    assert chat_dataset(llama3_tok, "json", openai, conversation_style="openai")[0] == expected

    bad_role = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "hi"}]}])
    with pytest.raises(ValueError, match=r"row 0: unknown role 'bot'"):
        chat_dataset(llama3_tok, "json", bad_role)


def test_text_completion_from_a_txt_file(tmp_path, llama3_tok):
    lines = ["The cat sat on the mat.", "Hello world!"]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    ds = text_completion_dataset(llama3_tok, "txt", str(tmp_path / "c.txt"))
    assert [ds[i]["tokens"] for i in range(2)] == [llama3_tok.encode(line) for line in lines]
    assert ds[0]["labels"] == ds[0]["tokens"]


def test_quickstart_assets():
    tok = quickstart_tokenizer()
    assert tok.vocab_size == 1024 and tok.path == assets_path("quickstart_tokenizer.model")
    train, val = quickstart_dataset(tok), quickstart_dataset(tok, split="validation")
    assert (len(train), len(val)) == (4000, 200)
    assert max(len(train[i]["tokens"]) for i in range(len(train))) <= 64
    assert all(max(train[i]["tokens"]) < tok.vocab_size for i in range(100))
    with pytest.raises(FileNotFoundError, match="no asset named 'x.bin'; available: quickstart_preference_train.jsonl, .*quickstart_tokenizer.model"):
        assets_path("x.bin")


def test_a_datasets_object_as_source(llama3_tok):
    import datasets

    rows = datasets.Dataset.from_list(ROWS)
    ds = instruct_dataset(llama3_tok, rows)
    assert ds[1]["tokens"] == expected_instruct(llama3_tok, ROWS[1])[0]
    with pytest.raises(ValueError, match="column 'output' not found; columns present: instruction, input"):
        instruct_dataset(llama3_tok, rows.remove_columns("output"))


def test_a_local_file_loads_without_progress_bars(tmp_path, capfd):
    import datasets

    from torchft.data.sources import load_rows

    path = tmp_path / "fresh.jsonl"  # new content: datasets generates its split (and used to draw a bar for it)
    path.write_text("".join(json.dumps({"instruction": f"say {i} {tmp_path.name}", "output": str(i)}) + "\n"
                            for i in range(3)))
    assert datasets.is_progress_bar_enabled()
    assert len(load_rows("json", data_files=str(path))) == 3
    out, err = capfd.readouterr()
    assert "Generating" not in out + err and "examples/s" not in out + err, out + err
    assert datasets.is_progress_bar_enabled()  # hub downloads keep theirs
