"""Generate the quickstart dataset and tokenizer shipped in this folder (deterministic; run from anywhere).

    python torchft/data/assets/generate_quickstart.py

Writes ``quickstart_train.jsonl`` / ``quickstart_validation.jsonl`` (instruction / input / output columns),
``quickstart_preference_train.jsonl`` / ``quickstart_preference_validation.jsonl`` (prompt / chosen / rejected:
the first rows of each split with the correct answer chosen over a plausible wrong one, for the DPO quickstart)
and ``quickstart_tokenizer.model`` (a Llama-3-format tiktoken ranks file: 256 bytes + merges learned from
the dataset; with the 256 special tokens the vocabulary is 1024). The tasks are small enough that a model
of dim 64-128 with 2-4 layers learns them in minutes on a CPU: upper-casing a word, adding two digits,
sorting digits, reversing a short list of words, repeating a word. All text is made up here.
"""
from __future__ import annotations

import json
import os
import random
import sys

WORDS = (
    "apple river stone cloud green house music light table water bread chair paper smile dream grass "
    "plane train happy quiet brave storm ocean tiger lemon candy field night sugar glass north south "
    "piano robot pearl honey mouse horse sheep queen king snow rain wind fire earth star moon sun tree "
    "bird fish frog duck lion bear wolf fox owl bee ant cat dog cow pig hen"
).split()

NUM_RANKS = 768  # 256 bytes + 512 merges; + 256 special tokens = a vocabulary of 1024


def make_sample(rng: random.Random) -> dict:
    task = rng.randrange(5)
    if task == 0:
        word = rng.choice(WORDS)
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    if task == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    if task == 2:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
        return {
            "instruction": "Sort the numbers from smallest to largest.",
            "input": " ".join(map(str, digits)),
            "output": " ".join(map(str, sorted(digits))),
        }
    if task == 3:
        words = rng.sample(WORDS, rng.randint(2, 4))
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words), "output": " ".join(words[::-1])}
    word = rng.choice(WORDS)
    n = rng.randint(2, 4)
    return {"instruction": f"Repeat the word {n} times.", "input": word, "output": " ".join([word] * n)}


def wrong_answer(sample: dict, rng: random.Random) -> str:
    """A plausible wrong output for a task: the mistake a model half-way through learning it makes."""
    instruction, inp, out = sample["instruction"], sample["input"], sample["output"]
    if instruction.startswith("Write the word"):
        return rng.choice([inp, inp.capitalize(), rng.choice([w for w in WORDS if w != inp]).upper()])
    if instruction.startswith("Add"):
        return str(int(out) + rng.choice([-2, -1, 1, 2]))
    if instruction.startswith("Sort"):
        wrong = inp if inp != out else " ".join(sorted(inp.split(), reverse=True))
        return wrong if wrong != out else out + " 0"
    if instruction.startswith("Reverse"):
        return inp
    n = len(out.split())
    return " ".join([inp] * (n + rng.choice([-1, 1])))


def preference_rows(samples: list[dict], rng: random.Random) -> list[dict]:
    """prompt (the instruction, a blank line and the input, as the instruct format renders it) / chosen / rejected."""
    return [{"prompt": f"{s['instruction']}\n\n{s['input']}", "chosen": s["output"], "rejected": wrong_answer(s, rng)}
            for s in samples]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(out_dir: str) -> None:
    rng = random.Random(1234)
    splits = {"train": [make_sample(rng) for _ in range(4000)], "validation": [make_sample(rng) for _ in range(200)]}
    for name, rows in splits.items():
        write_jsonl(os.path.join(out_dir, f"quickstart_{name}.jsonl"), rows)
    preference_rng = random.Random(5678)
    for name, count in (("train", 1000), ("validation", 100)):
        write_jsonl(os.path.join(out_dir, f"quickstart_preference_{name}.jsonl"),
                    preference_rows(splits[name][:count], preference_rng))

    from torchft.data.tokenizers.bpe import train_llama3_ranks

    # Texts as the chat format presents them, plus a plain word list so every word gets its own merges.
    texts = [f"user\n\n{r['instruction']}\n\n{r['input']}assistant\n\n{r['output']}" for r in splits["train"]]
    texts += [" ".join(WORDS), " ".join(w.upper() for w in WORDS)] * 4
    ranks = train_llama3_ranks(texts, num_merges=NUM_RANKS - 256, path=os.path.join(out_dir, "quickstart_tokenizer.model"))
    print(f"wrote {sum(map(len, splits.values()))} samples and a tokenizer with {len(ranks)} ranks to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
