"""Checkpointers used by the fine-tuning recipes: load the input model, save ``step_<N>/`` folders.

    ckpt = HFCheckpointer(checkpoint_dir, output_dir, keep_last_n=3)
    args = ckpt.model_args                         # LlamaArgs from config.json
    with torch.device("meta"):
        model = from_hf_config(args.to_hf_config())
    model.load_state_dict(ckpt.load_model_state_dict(), assign=True)
    ...
    ckpt.save(step, model, training_state={...})   # -> output_dir/step_<step>/

``save`` takes a state dict, or the model itself: its weights are then written one module at a time
(one shard held at once), and the adapters of a LoRA/DoRA/QLoRA model are merged onto the original
weights read again from ``checkpoint_dir`` (``merge_onto="checkpoint"``, the default) or onto the
model's own base weights (``merge_onto="model"``: for QLoRA, the dequantized NF4 weights).

Every step folder is written to a hidden temporary folder and renamed into place, so a folder named
``step_<N>`` is always complete; older folders are pruned only after the new one is in place. A
temporary folder that a killed save left behind is removed when the next save starts.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from torchft.checkpoint._io import (atomic_directory, copy_support_files, download_hint, refuse_nested_output,
                                   require_dir)
from torchft.checkpoint.hf import (
    drop_tied_output,
    find_weight_files,
    load_hf_args,
    load_hf_checkpoint,
    read_hf_config,
    write_hf_weights,
    CONFIG_FILE,
)
from torchft.checkpoint.peft import ADAPTER_DIR
from torchft.checkpoint.meta import (
    consolidated_file, load_meta_args, load_meta_checkpoint, read_meta_params, write_meta_weights,
)

log = logging.getLogger("torchft")

TRAINING_STATE_FILE = "training_state.pt"
REPO_ID_FILE = ".torchft_repo_id"  # written by `tune download` next to the files it fetched
_STEP_DIR = re.compile(r"step_(\d+)")
_UNFINISHED_STEP_DIR = re.compile(r"\.step_\d+\.tmp-.+")  # atomic_directory's temporary name for step_<N>
MERGE_ONTO = ("checkpoint", "model")

# Adapter recipes write the PEFT adapter into ``step_<N>/adapter/``, not beside the merged weights:
# transformers, finding ``adapter_config.json`` next to a ``config.json``, applies the adapter on top of
# that folder's weights, which would add it twice. So ``from_pretrained("step_<N>")`` is the merged
# model and ``PeftModel.from_pretrained(base, "step_<N>/adapter")`` the same model as base + adapter.
# (ADAPTER_DIR, imported above, names that sub-folder; the adapter loaders look into it too.)


def step_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete ``step_<N>`` folders under ``output_dir`` as ``(N, path)``, by increasing N."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_step_dir(output_dir: str | os.PathLike, *, require_training_state: bool = False) -> Path | None:
    """The ``step_<N>`` folder with the highest N (only those with ``training_state.pt`` if asked), or None.

    Temporary folders of an interrupted save are hidden (``.step_<N>.tmp-*``) and never returned.
    """
    for _, path in reversed(step_dirs(output_dir)):
        if not require_training_state or (path / TRAINING_STATE_FILE).is_file():
            return path
    return None


def remove_unfinished_saves(output_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary folders (``.step_<N>.tmp-*``) that a killed save left in ``output_dir``.

    Called before a save starts, when no save of this run is under way: such a folder can only be the
    unfinished save of an earlier process (``latest`` and pruning never see it). Logs one line; returns
    the names removed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    unfinished = sorted(p for p in output_dir.iterdir() if _UNFINISHED_STEP_DIR.fullmatch(p.name) and p.is_dir())
    for path in unfinished:
        shutil.rmtree(path, ignore_errors=True)
    if unfinished:
        log.warning("removed %s from %s: the unfinished save of an interrupted run (never resumable)",
                    ", ".join(p.name for p in unfinished), output_dir)
    return [p.name for p in unfinished]


def set_aside_later_steps(output_dir: str | os.PathLike, step: int) -> Path | None:
    """Move the ``step_<N>`` folders of ``output_dir`` with N > ``step`` into ``<output_dir>/abandoned_<UTC time>/``.

    A run resumed from step ``step`` abandons what the earlier run saved after it. Left in place, those
    folders would be pruned together with the new run's (``keep_last_n``), picked by
    ``resume_from_checkpoint=latest``, or replaced when the new run saves the same step; set aside,
    nothing is deleted and neither sees them (both look only at ``output_dir``'s own ``step_<N>``).
    Logs one line; returns the folder they went to, or None when there were none.
    """
    later = [path for n, path in step_dirs(output_dir) if n > step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, suffix = Path(output_dir) / f"abandoned_{stamp}", 1
    while True:  # two resumes within a second: the second gets its own folder
        try:
            aside.mkdir()
            break
        except FileExistsError:
            aside, suffix = Path(output_dir) / f"abandoned_{stamp}-{suffix}", suffix + 1
    for path in later:
        os.rename(path, aside / path.name)
    log.warning("resuming from step %d: moved %s, saved after it by the run this one abandons, to %s "
                "(kept; keep_last_n and resume_from_checkpoint=latest see only this run's step folders)",
                step, ", ".join(path.name for path in later), aside)
    return aside


def resolve_resume_dir(resume_from_checkpoint: Any, output_dir: str | os.PathLike) -> Path | None:
    """Turn a recipe's ``resume_from_checkpoint`` value into the step folder to resume from.

    ``None``/``False``/``""`` -> None (fresh start); ``True`` or ``"latest"`` -> the latest step
    folder of ``output_dir`` holding ``training_state.pt``; a path -> that folder. Errors name the folder.
    """
    if resume_from_checkpoint in (None, False, ""):
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "latest"):
        found = latest_step_dir(output_dir, require_training_state=True)
        if found is None:
            raise FileNotFoundError(f"{output_dir}: no step_<N> folder with {TRAINING_STATE_FILE} to resume from")
        return found
    path = require_dir(resume_from_checkpoint, "checkpoint folder to resume from")
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(f"{path / TRAINING_STATE_FILE}: training state not found, cannot resume")
    return path


def load_training_state(step_dir: str | os.PathLike, *, weights_only: bool = True) -> dict:
    """The ``training_state`` dict saved in ``step_dir`` (tensors on CPU).

    ``weights_only=True`` accepts tensors, numbers, strings, lists, tuples and dicts (optimizer and
    LR-scheduler state dicts, ``torch.get_rng_state()``, ``random.getstate()``); pass False for other
    Python objects in a file you trust.
    """
    path = require_dir(step_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training state not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        raise ValueError(f"{path}: unreadable training state ({err})") from err


class _StepCheckpointer:
    """Shared by the format-specific checkpointers; subclasses define the model files."""

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        keep_last_n: int | None = None,
        *,
        base_model_name_or_path: str | None = None,
        merge_onto: str = "checkpoint",
    ):
        if merge_onto not in MERGE_ONTO:
            raise ValueError(f"merge_onto ({merge_onto!r}) must be 'checkpoint' (the original weights of "
                             "checkpoint_dir) or 'model' (the model's own base weights, NF4 dequantized for QLoRA)")
        self.merge_onto = merge_onto
        self.checkpoint_dir = require_dir(checkpoint_dir, hint=download_hint(checkpoint_dir))
        refuse_nested_output(output_dir, checkpoint_dir)
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError(f"keep_last_n ({keep_last_n}) must be at least 1 (or None to keep every step)")
        self.output_dir = Path(output_dir)
        self.keep_last_n = keep_last_n
        self.base_model_name_or_path = base_model_name_or_path or self._recorded_repo_id()
        self._model_args = None

    def _recorded_repo_id(self) -> str | None:
        path = self.checkpoint_dir / REPO_ID_FILE
        if path.is_file():
            repo_id = path.read_text().strip()
            return repo_id or None
        return None

    @property
    def model_args(self):
        """``torchft.models.LlamaArgs`` of the input checkpoint (read once)."""
        if self._model_args is None:
            self._model_args = self._read_args()
        return self._model_args

    def step_dir(self, step: int) -> Path:
        """``<output_dir>/step_<step>``."""
        return self.output_dir / f"step_{int(step)}"

    def latest_step_dir(self, *, require_training_state: bool = True) -> Path | None:
        """Latest complete step folder of ``output_dir`` (resumable ones by default), or None."""
        return latest_step_dir(self.output_dir, require_training_state=require_training_state)

    load_training_state = staticmethod(load_training_state)

    def model_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(torchft key, CPU tensor)`` pairs of ``model``'s weights with its adapters merged, lazily.

        For a model with LoRA/DoRA layers and ``merge_onto="checkpoint"``, every frozen weight is
        read again (memory-mapped) from ``checkpoint_dir`` and each adapter is merged onto it: a
        layer without an adapter is written bit-identical to the input, and a QLoRA export is
        ``original + delta``, not the NF4 approximation. Nothing is built before it is asked for.
        """
        from torchft.modules.peft import get_lora_modules, iter_state_dict

        base_weights = None
        if self.merge_onto == "checkpoint" and get_lora_modules(model):
            base_weights = self.load_model_state_dict()  # memory-mapped: pages are read as tensors are used
        return iter_state_dict(model, merge_adapters=True, base_weights=base_weights, device="cpu")

    def save(
        self,
        step: int,
        model_state_dict: Mapping[str, torch.Tensor] | torch.nn.Module | None,
        *,
        adapter_model: torch.nn.Module | None = None,
        adapter_kwargs: Mapping[str, Any] | None = None,
        training_state: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``<output_dir>/step_<step>/`` atomically and return its path.

        Args:
            step: the optimizer step (the folder's number).
            model_state_dict: full model weights with torchft keys (merged: no adapter keys); or
                the model itself, written one module at a time with its adapters merged (onto the
                original weights of ``checkpoint_dir`` unless ``merge_onto="model"``, see
                ``model_weights``); or None for an adapter-only folder.
            adapter_model: a model with LoRA/DoRA layers; its adapter is written into
                ``step_<N>/adapter/`` with ``save_peft_adapter(adapter_model, folder,
                base_model_name_or_path=..., **adapter_kwargs)``; the base is named by the recorded hub
                repo id, else the input folder's path.
            training_state: opaque dict (optimizer, LR schedule, dataloader, RNG, step...) written
                to ``training_state.pt``; read back with ``load_training_state(step_dir)``.

        A step folder that already exists is replaced. After the new folder is in place, older
        step folders beyond ``keep_last_n`` are removed.
        """
        target = self.step_dir(step)
        remove_unfinished_saves(self.output_dir)
        with atomic_directory(target, overwrite=True) as tmp:
            if isinstance(model_state_dict, torch.nn.Module):
                self._write_model(self.model_weights(model_state_dict), tmp)
            elif model_state_dict is not None:
                self._write_model(model_state_dict, tmp)
            copy_support_files(self.checkpoint_dir, tmp)
            if adapter_model is not None:
                from torchft.checkpoint.peft import save_peft_adapter

                # A sub-folder, not beside config.json: transformers applies an adapter_config.json it
                # finds next to the weights on top of them, and these weights are already merged.
                base = self.base_model_name_or_path or str(self.checkpoint_dir.resolve())
                save_peft_adapter(adapter_model, tmp / ADAPTER_DIR, base_model_name_or_path=base,
                                  **dict(adapter_kwargs or {}))
            if training_state is not None:
                torch.save(dict(training_state), tmp / TRAINING_STATE_FILE)
        self.prune(keep=target)
        return target

    def prune(self, keep: Path) -> None:
        """Delete the oldest step folders beyond ``keep_last_n`` (``keep``, the one just written, stays)."""
        if self.keep_last_n is None:
            return
        others = [path for _, path in step_dirs(self.output_dir) if path != keep]
        for path in others[: max(0, len(others) - (self.keep_last_n - 1))]:
            # Rename first: a deletion cut short must not leave a half-empty folder named step_<N>.
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.deleting-", dir=self.output_dir))
            os.rename(path, trash / path.name)
            shutil.rmtree(trash, ignore_errors=True)

    # Subclasses ----------------------------------------------------------------------------------
    def _read_args(self):
        raise NotImplementedError

    def check_weight_files(self) -> None:
        """Raise FileNotFoundError naming what is missing when the input's weight files are not all
        there (reads no weights)."""
        raise NotImplementedError

    def load_model_state_dict(self, step_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _write_model(self, state_dict: Mapping[str, torch.Tensor], folder: Path) -> None:
        raise NotImplementedError


class HFCheckpointer(_StepCheckpointer):
    """Reads an HF Llama folder; writes HF step folders that transformers (and peft) load as is.

    Args:
        checkpoint_dir: the input folder (``config.json``, safetensors or .bin weights, tokenizer files).
        output_dir: where ``step_<N>/`` folders go; must not be inside ``checkpoint_dir``.
        keep_last_n: keep only this many step folders (None keeps all).
        max_shard_size: shard size of saved weights (``"5GB"``, ``"500MiB"`` or bytes).
        base_model_name_or_path: written into ``adapter_config.json``; defaults to the repo id
            ``tune download`` recorded in ``checkpoint_dir/.torchft_repo_id``, else None.
        merge_onto: what ``save(step, model)`` merges adapters onto: ``"checkpoint"`` (the original
            weights of ``checkpoint_dir``, read again) or ``"model"`` (the model's base weights; for
            QLoRA their NF4 approximation, dequantized).

    A step folder holds ``model*.safetensors`` (+ index), the input's ``config.json``, the copied
    tokenizer / generation files, ``adapter_model.safetensors`` + ``adapter_config.json`` when an
    adapter model is passed, and ``training_state.pt`` when a training state is passed.
    """

    def __init__(self, checkpoint_dir, output_dir, keep_last_n=None, *, max_shard_size: int | str = "5GB",
                 base_model_name_or_path: str | None = None, merge_onto: str = "checkpoint"):
        super().__init__(checkpoint_dir, output_dir, keep_last_n, base_model_name_or_path=base_model_name_or_path,
                         merge_onto=merge_onto)
        self.max_shard_size = max_shard_size
        self.hf_config = read_hf_config(self.checkpoint_dir)

    def _read_args(self):
        return load_hf_args(self.checkpoint_dir)

    def check_weight_files(self) -> None:
        find_weight_files(self.checkpoint_dir)  # every shard an index names must exist

    def load_model_state_dict(self, step_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        """torchft state dict of the input (or of a saved ``step_dir``), checked against ``model_args``."""
        return load_hf_checkpoint(step_dir or self.checkpoint_dir, expected=self.model_args)

    def _write_model(self, state_dict, folder):
        state_dict = drop_tied_output(state_dict, self.hf_config)
        write_hf_weights(state_dict, folder, self.max_shard_size)
        (folder / CONFIG_FILE).write_text(json.dumps(self.hf_config, indent=2, sort_keys=True) + "\n")


class MetaCheckpointer(_StepCheckpointer):
    """Reads a Meta folder (``consolidated.00.pth`` + ``params.json``); writes the same format per step.

    Same surface as ``HFCheckpointer``. ``max_seq_len`` overrides the context length, which Meta's
    ``params.json`` does not record. Step folders hold ``consolidated.00.pth``, the input's
    ``params.json``, the copied ``tokenizer.model``, and the adapter / training state when given.
    """

    def __init__(self, checkpoint_dir, output_dir, keep_last_n=None, *, max_seq_len: int | None = None,
                 base_model_name_or_path: str | None = None, merge_onto: str = "checkpoint"):
        super().__init__(checkpoint_dir, output_dir, keep_last_n, base_model_name_or_path=base_model_name_or_path,
                         merge_onto=merge_onto)
        self.max_seq_len = max_seq_len
        self.params = read_meta_params(self.checkpoint_dir)

    def _read_args(self):
        return load_meta_args(self.checkpoint_dir, max_seq_len=self.max_seq_len)

    def check_weight_files(self) -> None:
        consolidated_file(self.checkpoint_dir)

    def load_model_state_dict(self, step_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        """torchft state dict (q/k in rotate-half layout) of the input or of a saved ``step_dir``."""
        return load_meta_checkpoint(step_dir or self.checkpoint_dir, expected=self.model_args)

    def _write_model(self, state_dict, folder):
        # consolidated.00.pth is one torch.save file: the weights are gathered first (originals stay memory-mapped).
        write_meta_weights(dict(state_dict.items() if isinstance(state_dict, Mapping) else state_dict),
                           folder, self.params)
