"""The examples in docs/checkpoints.md run as written (in order, sharing one namespace)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md"


def test_checkpoint_docs_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "missing key norm.weight" in printed and "['step_200', 'step_300']" in printed
