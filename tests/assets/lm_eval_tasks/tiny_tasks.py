"""Loads the tiny tasks' JSON files that sit beside this file, so the tasks work from any directory."""
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{name}.json")})


def load_mc(**kwargs) -> datasets.DatasetDict:
    return _load("tiny_mc")


def load_gen(**kwargs) -> datasets.DatasetDict:
    return _load("tiny_gen")


def load_ppl(**kwargs) -> datasets.DatasetDict:
    return _load("tiny_ppl")
