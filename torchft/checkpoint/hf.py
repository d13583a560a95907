"""The Hugging Face format: ``model*.safetensors`` (+ ``model.safetensors.index.json``) or
``pytorch_model*.bin`` (+ its index), next to ``config.json``.

torchft modules carry transformers' names and RoPE layout, so the key map is a rename:
``model.<key>`` <-> ``<key>``, and ``lm_head.weight`` stays as it is. Tensors are memory-mapped
from the files, so ``model.load_state_dict(sd, assign=True)`` on a meta-built model holds one copy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torchft.checkpoint._io import (
    CheckpointError,
    atomic_directory,
    copy_support_files,
    not_safetensors_error,
    parse_size,
    refuse_nested_output,
    require_dir,
    to_plain_tensor,
    unshare_tensors,
)
from torchft.checkpoint.validate import check_state_dict, expected_shapes, is_adapter_key

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG_FILE = "config.json"

# Buffers some older transformers versions saved; they are recomputed, never loaded.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_torchft_key(key: str) -> str | None:
    """``model.layers.0.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj.weight``; None for unknown keys."""
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return key[len("model."):]
    return None


def torchft_to_hf_key(key: str) -> str:
    """``layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``; ``lm_head.weight`` stays."""
    return key if key == "lm_head.weight" else "model." + key


# ---------------------------------------------------------------------------------------------------
# config.json


def read_hf_config(checkpoint_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of ``checkpoint_dir``; errors name the file."""
    path = require_dir(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable config.json ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json must hold a JSON object")
    return config


def load_hf_args(checkpoint_dir: str | os.PathLike):
    """``torchft.models.LlamaArgs`` from ``checkpoint_dir/config.json``.

    The config is interpreted by ``LlamaArgs.from_hf_config``; its error (e.g. another
    architecture) is raised as a ``CheckpointError`` prefixed with the file name.
    """
    from torchft.models import LlamaArgs

    config = read_hf_config(checkpoint_dir)
    path = Path(checkpoint_dir) / CONFIG_FILE
    try:
        return LlamaArgs.from_hf_config(config)
    except (ValueError, KeyError, TypeError) as err:
        message = str(err).strip("'\"")
        raise CheckpointError(f"{path}: {message}") from err


# ---------------------------------------------------------------------------------------------------
# loading


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index_path}: unreadable index ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: index has no 'weight_map'")
    return weight_map


def find_weight_files(checkpoint_dir: str | os.PathLike) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """The weight files of an HF folder: ``(files, index path or None, index weight_map or None)``.

    Preference: safetensors index, ``model.safetensors``, other ``model*.safetensors``, then the same
    for ``pytorch_model*.bin``. Every shard an index names must exist.
    """
    folder = require_dir(checkpoint_dir)
    for index_name, single, pattern in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "model*.safetensors"),
        (BIN_INDEX, BIN_SINGLE, "pytorch_model*.bin"),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = _read_index(index_path)
            files = []
            for shard in dict.fromkeys(weight_map.values()):  # unique, in order
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"{shard_path}: shard named in {index_name} does not exist")
                files.append(shard_path)
            return files, index_path, weight_map
        if (folder / single).is_file():
            return [folder / single], None, None
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if files:
            return files, None, None
    raise FileNotFoundError(
        f"{folder}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{BIN_SINGLE} or {BIN_INDEX})"
    )


class _Entry:
    """Where one tensor lives and its shape, read from the file header without touching the data."""

    __slots__ = ("file", "shape", "tensor")

    def __init__(self, file: Path, shape: torch.Size, tensor: torch.Tensor | None = None):
        self.file, self.shape, self.tensor = file, shape, tensor


def _scan_safetensors(path: Path) -> dict[str, _Entry]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: _Entry(path, torch.Size(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise not_safetensors_error(path, err) from err


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise CheckpointError(f"{path}: unreadable PyTorch file ({err})") from err
        # Files written before torch's zip format cannot be memory-mapped; read them whole.
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err2:
            raise CheckpointError(f"{path}: unreadable PyTorch file ({err2})") from err2
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable PyTorch file ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return data


def _scan_bin(path: Path) -> dict[str, _Entry]:
    return {k: _Entry(path, v.shape, v) for k, v in _load_bin(path).items()}


def load_hf_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    expected: Any = None,
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """Load an HF Llama checkpoint folder as a torchft state dict (memory-mapped, no copy).

    Args:
        checkpoint_dir: folder with ``model.safetensors``, ``model-0000i-of-0000N.safetensors`` +
            ``model.safetensors.index.json``, or ``pytorch_model*.bin`` (+ its index).
        expected: ``LlamaArgs`` or a (meta) model to check keys and shapes against. When None and
            ``validate`` is set, ``config.json`` in the folder is used if there is one.
        validate: set False to skip the check against the config.

    Returns:
        torchft keys (``layers.0.self_attn.q_proj.weight``, ``lm_head.weight``...) to CPU tensors in
        the files' dtype. Every problem (missing/unexpected key, shape, corrupt shard) is raised
        before any tensor data is read. For a tied model a stray ``lm_head.weight`` is dropped.

    Example::

        with torch.device("meta"):
            model = from_hf_config(path)
        model.load_state_dict(load_hf_checkpoint(path), assign=True)
    """
    folder = require_dir(checkpoint_dir)
    files, index_path, weight_map = find_weight_files(folder)

    # 1. Headers only: where each key lives and its shape.
    entries: dict[str, _Entry] = {}
    for path in files:
        scanned = _scan_safetensors(path) if path.suffix == ".safetensors" else _scan_bin(path)
        for key, entry in scanned.items():
            if key in entries:
                raise CheckpointError(f"{path}: key {key} also appears in {entries[key].file.name}")
            entries[key] = entry
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in entries:
                raise CheckpointError(f"{folder / shard}: missing key {key} (listed in {index_path.name})")

    # 2. Rename to torchft keys.
    renamed: dict[str, _Entry] = {}
    hf_names: dict[str, str] = {}
    for key, entry in entries.items():
        if key.endswith(_IGNORED_HF_SUFFIXES):
            continue
        new_key = hf_to_torchft_key(key)
        if new_key is None:
            raise CheckpointError(f"{entry.file}: unexpected key {key} (not a Llama causal-LM weight)")
        renamed[new_key] = entry
        hf_names[new_key] = key

    # 3. Check against the config before any data is touched.
    if expected is None and validate and (folder / CONFIG_FILE).is_file():
        expected = load_hf_args(folder)
    if expected is not None:
        want = expected_shapes(expected)
        if "lm_head.weight" in renamed and "lm_head.weight" not in want:
            # Tied embeddings: the output projection reuses embed_tokens.weight.
            del renamed["lm_head.weight"]
        check_state_dict(
            {k: e.shape for k, e in renamed.items()}, want,
            sources={k: e.file for k, e in renamed.items()},
            where=folder,
            key_names={k: hf_names.get(k, torchft_to_hf_key(k)) for k in {*want, *renamed}},
        )

    # 4. Materialize: safetensors tensors are views of a memory map of the file.
    state_dict: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, entry in renamed.items():
        if entry.tensor is not None:
            state_dict[key] = entry.tensor
        else:
            by_file.setdefault(entry.file, []).append(key)
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                state_dict[key] = f.get_tensor(hf_names[key])
    return {k: state_dict[k] for k in renamed}


# ---------------------------------------------------------------------------------------------------
# saving


def _config_dict(config: Any) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    if hasattr(config, "to_hf_config"):
        return dict(config.to_hf_config())
    raise TypeError(f"config must be LlamaArgs, a dict or None, got {type(config).__name__}")


def plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_size: int | str = "5GB") -> list[list[str]]:
    """The keys of each shard file, as :func:`write_hf_weights` splits them (greedy in key order; a
    tensor bigger than ``max_shard_size`` gets a shard of its own), for writers that need the split
    before the tensors exist in one place (the sharded save of distributed recipes)."""
    max_bytes = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _flush_shard(shard: dict[str, torch.Tensor], path: Path) -> None:
    save_file(unshare_tensors(shard), path, metadata={"format": "pt"})  # transformers checks "format"


def write_hf_weights(
    state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    folder: Path,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write HF-named safetensors shards (+ index) into an existing folder; return the file names.

    ``state_dict`` is a mapping or an iterable of ``(torchft key, tensor)`` pairs (e.g.
    ``iter_state_dict(model)``): tensors are taken one at a time and each shard is written as soon as
    it is full, so at most one shard (``max_shard_size``) is held at once. Shards are filled greedily
    in key order; a tensor bigger than ``max_shard_size`` gets a shard of its own.

    Not atomic on its own: ``save_hf_checkpoint`` and the checkpointers call it inside a temporary folder.
    """
    max_bytes = parse_size(max_shard_size)
    pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    written: list[tuple[Path, list[str]]] = []  # (temporary shard file, its HF keys)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    for key, tensor in pairs:
        if is_adapter_key(key):
            raise CheckpointError(
                f"state dict key {key} is an adapter weight: merge adapters into the base weights "
                "first, or save them with save_peft_adapter"
            )
        tensor = to_plain_tensor(tensor).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_bytes:
            written.append((folder / f"model-{len(written) + 1:05d}.partial", list(shard)))
            _flush_shard(shard, written[-1][0])
            shard, shard_bytes = {}, 0
        shard[torchft_to_hf_key(key)] = tensor
        shard_bytes += nbytes
        total += nbytes
    if not written:
        _flush_shard(shard, folder / SAFETENSORS_SINGLE)
        return [SAFETENSORS_SINGLE]
    written.append((folder / f"model-{len(written) + 1:05d}.partial", list(shard)))
    _flush_shard(shard, written[-1][0])
    names, weight_map = [], {}
    for i, (path, keys) in enumerate(written, start=1):
        name = f"model-{i:05d}-of-{len(written):05d}.safetensors"  # the count is known only now
        os.rename(path, folder / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFETENSORS_INDEX]


def write_hf_config(config: Any, folder: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` from ``LlamaArgs`` (``to_hf_config()``, plus the weights' dtype) or a dict as is."""
    is_dict = isinstance(config, dict)
    config = _config_dict(config)
    if config is None:
        return
    if not is_dict and state_dict and "dtype" not in config and "torch_dtype" not in config:
        dtype = next(iter(state_dict.values())).dtype
        config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def drop_tied_output(state_dict, config: Any):
    """Without ``lm_head.weight`` when the config ties embeddings (the HF files of a tied model lack it).

    A mapping gives a dict; an iterable of ``(key, tensor)`` pairs gives a lazy iterable of pairs.
    """
    config = _config_dict(config)
    tied = bool(config and config.get("tie_word_embeddings", False))
    if not isinstance(state_dict, Mapping):
        return ((k, v) for k, v in state_dict if not (tied and k == "lm_head.weight"))
    state_dict = dict(state_dict)
    if tied:
        state_dict.pop("lm_head.weight", None)
    return state_dict


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    output_dir: str | os.PathLike,
    *,
    config: Any = None,
    max_shard_size: int | str = "5GB",
    copy_files_from: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a torchft state dict as an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        state_dict: torchft keys to tensors (parameters, DTensors and NF4 weights are converted).
        output_dir: the folder to create. Written to a hidden temporary sibling and renamed into
            place, so an interrupted save leaves nothing that looks complete.
        config: ``LlamaArgs`` (written with ``to_hf_config()``) or a config dict written as is; None
            writes no config.json. A config with ``tie_word_embeddings`` drops ``lm_head.weight``.
        max_shard_size: bytes per shard, an int or ``"5GB"``/``"500MiB"``; one ``model.safetensors``
            when everything fits, else ``model-0000i-of-0000N.safetensors`` + the index.
        copy_files_from: the input checkpoint folder to copy tokenizer/generation files from. The
            output folder must not be inside it.
        overwrite: replace an existing non-empty ``output_dir`` (otherwise an error).

    Returns:
        ``output_dir`` as a Path.
    """
    refuse_nested_output(output_dir, copy_files_from)
    state_dict = drop_tied_output(state_dict, config)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        write_hf_weights(state_dict, tmp, max_shard_size)
        write_hf_config(config, tmp, state_dict)
        copy_support_files(copy_files_from, tmp)
    return Path(output_dir)
