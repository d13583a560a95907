"""Where rows come from: local json/jsonl/csv/parquet/txt files or dataset names on the HF hub.

Local text files are checked before ``datasets`` parses them, so a bad byte or a malformed JSON line is
reported as ``file:line`` / ``file: byte offset`` instead of a deep parser traceback.
"""
from __future__ import annotations

import codecs
import contextlib
import glob
import json
import os

# source name -> the HF ``datasets`` builder that reads it
LOCAL_BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "text": "text", "txt": "text"}
_TEXT_BUILDERS = {"json", "csv", "text"}
_CHUNK = 16 << 20
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def _local_files(data_files) -> list[str]:
    if isinstance(data_files, dict):
        files = [f for v in data_files.values() for f in ([v] if isinstance(v, str) else v)]
    elif isinstance(data_files, str):
        files = [data_files]
    else:
        files = list(data_files)
    paths = []
    for f in files:
        matches = sorted(glob.glob(f)) if any(c in f for c in "*?[") else [f]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"data file not found: {f}")
        paths.extend(matches)
    return paths


def check_text_file(path: str) -> bool:
    """Raise ValueError at the first non-UTF-8 byte (with its offset and line); True when not blank."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, nonblank = 0, 0, False
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = offset + e.start
                line = lines + chunk.count(b"\n", 0, e.start) + 1
                raise ValueError(f"{path}: not valid UTF-8 at byte offset {bad} (line {line})") from None
            nonblank = nonblank or bool(chunk.strip())
            lines += chunk.count(b"\n")
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8: the file ends inside a character") from None
    return nonblank


def find_bad_jsonl_line(path: str) -> None:
    """Raise ValueError naming ``file:line`` of the first line that is not a JSON value."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None


def _is_jsonl(path: str) -> bool:
    """A .jsonl file, or a .json file that is not one JSON document (an array or a pretty-printed object)."""
    if path.endswith(".jsonl"):
        return True
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return False
    with open(path, "rb") as f:
        first = f.readline()
    try:
        json.loads(first)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        # One JSON document over several lines: datasets parses it whole; check that it parses.
        with open(path, "rb") as f:
            try:
                json.loads(f.read())
            except UnicodeDecodeError:
                return True  # let the line check report the offset
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return False


def local_source(source: str, data_files=None) -> tuple[str | None, list[str]]:
    """The ``datasets`` builder and the files of a local source, or ``(None, [])`` for a hub dataset name.

    Raises (ValueError, FileNotFoundError) on what :func:`load_rows` would refuse before reading a row:
    a local format without ``data_files``, a data file that does not exist, a path of an unknown type.
    Nothing is read, so ``tune validate`` and a recipe's start run it too.
    """
    builder = LOCAL_BUILDERS.get(source)
    if builder is None and data_files is None and isinstance(source, str) and os.path.exists(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in _EXTENSIONS:
            raise ValueError(f"{source}: unknown file type {ext!r}; use one of {', '.join(sorted(_EXTENSIONS))}")
        builder, data_files = _EXTENSIONS[ext], source
    if builder is None:
        return None, []
    if data_files is None:
        raise ValueError(f"source={source!r} reads local files: set data_files to a path")
    return builder, _local_files(data_files)


@contextlib.contextmanager
def _quiet_progress_bars(datasets):
    """No ``datasets`` progress bars inside the block (those of hub downloads stay, outside it)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_rows(source: str, data_files=None, split: str = "train", **load_kwargs):
    """Load a ``datasets.Dataset`` of rows.

    Args:
        source: ``json`` (also JSONL), ``csv``, ``parquet``, ``text``/``txt`` (one row per line, column
            ``text``) with ``data_files``; a path to such a file; a dataset name on the HF hub; or a
            ``datasets.Dataset`` already in hand (returned as is).
        data_files: file path(s) or glob(s) for local sources (also passed through for hub datasets).
        split: split to load (``train``, ``validation``, ``train[:90%]`` ...). Local files are assigned to it.
        load_kwargs: forwarded to ``datasets.load_dataset`` (``name``, ``revision``, ``field`` ...).
    """
    import datasets

    if isinstance(source, datasets.Dataset):  # rows already loaded (or built in memory) by the caller
        if len(source) == 0:
            raise ValueError("dataset is empty (the datasets.Dataset passed as source has 0 rows)")
        return source
    builder, files = local_source(source, data_files)
    if builder is not None:
        if builder in _TEXT_BUILDERS:
            if not any([check_text_file(path) for path in files]):
                raise ValueError(f"dataset {source if data_files is None else data_files} is empty "
                                 f"(no rows in {', '.join(files)})")
        jsonl_files = [p for p in files if builder == "json" and _is_jsonl(p)]
        if not isinstance(data_files, dict):
            # Local files become the requested split (``train[:10%]`` slices the ``train`` split).
            data_files = {split.split("[")[0]: files}
        try:
            with _quiet_progress_bars(datasets):  # "Generating train split" over a local file: noise
                rows = datasets.load_dataset(builder, data_files=data_files, split=split, **load_kwargs)
        except Exception:
            # Parsing JSONL line by line up front would double the load time; on failure, find the line.
            for path in jsonl_files:
                find_bad_jsonl_line(path)
            raise
    else:
        rows = datasets.load_dataset(source, data_files=data_files, split=split, **load_kwargs)
    if len(rows) == 0:
        where = data_files if data_files is not None else source
        raise ValueError(f"dataset {where} is empty (0 rows in split {split!r})")
    return rows
