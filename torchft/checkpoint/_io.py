"""Helpers shared by every checkpoint format: errors, atomic folder writes, support-file copies."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from torchft.modules.peft._nf4 import dequantize


class CheckpointError(ValueError):
    """A checkpoint file or folder is malformed; the message names the file and the problem."""


# What to do about a damaged file: said after every "truncated or corrupt" / "unreadable" message.
REPLACE_FILE_HINT = "replace it with a complete copy (download or copy it again)"


def not_safetensors_error(path: str | os.PathLike, err: Exception) -> CheckpointError:
    """The error for a file safetensors cannot open (a download cut short, a damaged copy)."""
    return CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupt ({err}); {REPLACE_FILE_HINT}")


def download_hint(checkpoint_dir: str | os.PathLike) -> str:
    """What to do when a config's model folder is missing (or its files are damaged)."""
    return (f"download the model there, e.g. `tune download REPO_ID --output-dir {checkpoint_dir}`, "
            "or set checkpointer.checkpoint_dir=PATH")


def require_dir(path: str | os.PathLike, what: str = "checkpoint folder", hint: str | None = None) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it (and ``hint``, what to do) when it
    is not a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} does not exist" + (f" ({hint})" if hint else ""))
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: {what} is not a folder")
    return path


def refuse_nested_output(output_dir: str | os.PathLike, input_dir: str | os.PathLike | None) -> None:
    """Refuse an output folder equal to, or inside, the input checkpoint folder.

    Saving there would mix outputs with the weights being read (and a later load of the input folder
    would pick up the outputs' shards).
    """
    if input_dir is None:
        return
    out = Path(output_dir).resolve()
    src = Path(input_dir).resolve()
    if out == src or src in out.parents:
        raise CheckpointError(
            f"{output_dir}: output folder must not be inside the input checkpoint folder {input_dir}"
        )


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Flush file contents, then the folder entries, so a crash right after the rename cannot leave a
    # complete-looking folder with empty files.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _plain_permissions(path: Path) -> None:
    """Give a temporary file or folder the mode a plain ``open``/``mkdir`` would have under the umask:
    ``tempfile`` makes them private (0600/0700), which would keep other users and serving processes out."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_current_umask())


def _replace_durably(tmp: Path, target: Path) -> None:
    """Rename the flushed ``tmp`` (file or folder) to ``target`` and flush the parent folder, so the
    rename itself survives a power loss (a rename is only durable once its folder entry is on disk).
    When ``tmp`` is a folder, an existing folder ``target`` is moved aside first (a folder cannot be
    renamed over a non-empty one) and deleted once the new one is in place."""
    _plain_permissions(tmp)
    old = None
    if tmp.is_dir() and target.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "replaced")
    os.replace(tmp, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target``; rename it to ``target`` when the block succeeds.

    The temporary folder is named ``.<target name>.tmp-XXXX`` (hidden, never matched as a step
    folder). If the block raises, it is removed and ``target`` is untouched, so an interrupted save
    never leaves a folder that looks complete. Contents, the rename and the parent folder are
    fsynced. With ``overwrite=True`` an existing ``target`` is replaced (moved aside, then deleted
    once the new folder is in place); otherwise an existing, non-empty ``target`` is an error.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: output path exists and is not a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target}: output folder exists and is not empty (pass overwrite=True to replace it)")
    tmp = temporary_sibling(target)
    try:
        yield tmp
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temporary_sibling(target: str | os.PathLike) -> Path:
    """A new empty folder ``.<target name>.tmp-XXXX`` beside ``target`` (hidden: never taken for a step
    folder), to be renamed to ``target`` by ``commit_directory`` once complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def commit_directory(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Flush the finished folder ``tmp`` and rename it over ``target`` (replacing one that exists),
    then flush the parent folder. ``atomic_directory`` does this for the folders it yields.

    Every entry inside gets the permissions of a plain ``open``/``mkdir`` too: some writers make private
    files (safetensors' ``save_file`` creates 0600 files whatever the umask)."""
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames + filenames:
            _plain_permissions(Path(dirpath) / name)
    _fsync_tree(Path(tmp))
    _replace_durably(Path(tmp), Path(target))


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; write it in the block, and it replaces ``target``.

    Same guarantees as ``atomic_directory`` for one file: a reader sees the old file or the whole
    new one, never a part; if the block raises, ``target`` is untouched and the temporary is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_path(tmp)
        _replace_durably(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Files a downstream tool needs next to the weights: tokenizer, chat template, generation defaults.
SUPPORT_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template*",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "original/tokenizer.model",
    "original/tokenizer.json",
    ".torchft_repo_id",
)


def copy_support_files(src_dir: str | os.PathLike | None, dst_dir: Path) -> list[str]:
    """Copy tokenizer / generation files (``SUPPORT_FILE_PATTERNS``) from ``src_dir``; return their names.

    A folder whose tokenizer is only Meta's ``tokenizer.model`` (tiktoken or sentencepiece) also gets the
    HF files written from it (``tokenizer.json``, ``tokenizer_config.json`` with the chat template, ...), so
    ``AutoTokenizer`` and inference engines load it as torchft tokenizes.
    """
    if src_dir is None:
        return []
    src_dir = require_dir(src_dir, "folder to copy tokenizer files from")
    copied = []
    for pattern in SUPPORT_FILE_PATTERNS:
        for src in sorted(src_dir.glob(pattern)):
            if not src.is_file():
                continue
            rel = src.relative_to(src_dir)
            if (dst_dir / rel).exists():
                continue
            (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst_dir / rel)
            copied.append(str(rel))
    from torchft.data.tokenizers.hf_files import write_hf_tokenizer_files

    return copied + write_hf_tokenizer_files(dst_dir)


_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (powers of 10) / ``"500MiB"`` (powers of 2)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size ({size}) must be positive")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size ({size!r}) must be a byte count or a string like '5GB' or '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def to_plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain, contiguous CPU-or-device tensor from a parameter, DTensor or NF4 weight, for saving."""
    if hasattr(tensor, "full_tensor"):  # DTensor (FSDP2): gather the full weight.
        tensor = tensor.full_tensor()
    tensor = dequantize(tensor)  # torchao NF4Tensor: to its original dtype
    if isinstance(tensor, torch.nn.Parameter):
        tensor = tensor.data
    return tensor.detach().contiguous()


def unshare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, each repeat of a storage already seen replaced by a copy.

    safetensors refuses tensors that share memory (a tied or untied copy of the embedding, views).
    """
    seen: set[tuple[str, int]] = set()
    out = {}
    for key, tensor in tensors.items():
        ident = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if ident in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    return out
