"""The wheel ships every recipe config and the quickstart assets, and building it warns about nothing."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def test_wheel_has_the_configs_and_assets_without_setuptools_warnings(tmp_path):
    pytest.importorskip("setuptools")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", str(REPO),
         "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BuildBackendWarning" not in proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("torchft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"torchft/_recipes/configs/{p.relative_to(REPO / 'recipes' / 'configs').as_posix()}"
               for p in (REPO / "recipes" / "configs").rglob("*.yaml")}
    assert configs <= names and "torchft/data/assets/quickstart_train.jsonl" in names
