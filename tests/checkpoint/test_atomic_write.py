"""The one atomic write: contents flushed, renamed into place, then the parent folder flushed."""
import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from torchft.checkpoint._io import atomic_directory, atomic_file


@pytest.fixture
def events(monkeypatch):
    """What is fsynced (by path) and renamed, in order."""
    log = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        log.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(src, dst):
        log.append(("rename", os.path.realpath(dst)))
        real_rename(src, dst)

    def replace(src, dst):
        log.append(("rename", os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return log


def _renamed_then_parent_synced(log, target):
    target, parent = os.path.realpath(target), os.path.realpath(os.path.dirname(target))
    last_rename = max(i for i, event in enumerate(log) if event == ("rename", target))
    return ("fsync", parent) in log[last_rename + 1:]


def test_folder_rename_is_followed_by_an_fsync_of_the_parent(tmp_path, events):
    for overwrite in (False, True):
        with atomic_directory(tmp_path / "out" / "step_1", overwrite=overwrite) as tmp:
            (tmp / "weights.bin").write_bytes(b"1234")
        assert (tmp_path / "out" / "step_1" / "weights.bin").read_bytes() == b"1234"
        assert _renamed_then_parent_synced(events, tmp_path / "out" / "step_1")
        events.clear()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_1"]  # nothing left aside


def test_file_write_is_flushed_renamed_and_the_parent_synced(tmp_path, events):
    target = tmp_path / "adapter_config.json"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _renamed_then_parent_synced(events, target)
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_get_the_permissions_of_a_plain_mkdir_under_the_umask(tmp_path, umask, dir_mode, file_mode):
    # tempfile makes private 0700/0600 entries; a finished output must be readable as the umask allows.
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "step_1") as tmp:
            with atomic_file(tmp / "model.safetensors") as f:
                f.write_bytes(b"weights")
            # writers that make private entries themselves: safetensors' save_file (0600), a private folder
            save_file({"w": torch.zeros(2)}, tmp / "model-00001-of-00002.safetensors")
            tempfile.mkdtemp(dir=tmp)
        with atomic_file(tmp_path / "alone.json") as f:
            f.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "step_1").stat().st_mode & 0o777 == dir_mode
    for entry in (tmp_path / "step_1").rglob("*"):
        assert entry.stat().st_mode & 0o777 == (dir_mode if entry.is_dir() else file_mode), entry
    assert len(list((tmp_path / "step_1").rglob("*"))) == 3
    assert (tmp_path / "alone.json").stat().st_mode & 0o777 == file_mode
