"""The examples of docs/data.md run as written."""
import os
import re

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "data.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(DOC).read(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/data.md example {index}", "exec"), {})


def test_docs_have_examples():
    assert len(BLOCKS) >= 6
