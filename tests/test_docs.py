"""Every ```python block in docs/ and README.md runs: the examples users copy must work.

The blocks of one page run in order in one fresh interpreter (a page can build on its earlier
blocks), inside a temporary working directory. Blocks that need things this machine cannot have
(a GPU, a downloaded model) are written as ```text or ```bash instead.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _pages_with_code():
    return [p for p in PAGES if p.exists() and BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path):
    code = "\n\n".join(BLOCK.findall(page.read_text()))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page.name} examples failed:\n{result.stderr[-3000:]}"
