"""Step folders of a sharded run, written by every rank at once and never gathered on one.

``save_sharded_step`` writes ``<output_dir>/step_<N>/`` as the single-device recipes do, plus the
sharded training state:

    step_<N>/model*.safetensors (+ index)   the (merged) model; each rank writes its own rows with DCP's
                                            HuggingFaceStorageWriter, then rank 0 joins the files
                                            (adapters merged onto its rows of the input checkpoint)
    step_<N>/config.json, tokenizer files   copied from the input model
    step_<N>/adapter/                       adapter recipes: the PEFT adapter (small, gathered on rank 0)
    step_<N>/distributed/                   DCP: the trainable weights (full: the model; adapters: the
                                            adapters, never the frozen base) and the optimizer, sharded
    step_<N>/training_state.pt              step, LR schedule, data position, RNG, what run wrote it

Rank 0 creates a hidden temporary folder, every rank writes into it, and rank 0 renames it into place
after all have finished: a save cut short leaves only ``.step_<N>.tmp-*``, which
``resume_from_checkpoint=latest`` never picks (and the next save removes). DCP reshards on load, so a
run resumes at any world size (the global batch stays the same, so the data position carries over).
With ``async_save`` (:class:`BackgroundSaves`) the ``distributed/`` shards are written in the
background while training goes on, and the folder keeps its temporary name until they are complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from torchft.training.distributed import full_tensor

log = logging.getLogger("torchft")
DCP_DIR = "distributed"


def _broadcast(value):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_temporary_folder(target: Path, is_main: bool) -> Path:
    """The hidden temporary folder of ``target`` that every rank writes into, made by rank 0 (a collective);
    rank 0 first removes what an interrupted run's save left (no save of this run is under way)."""
    from torchft.checkpoint._io import temporary_sibling
    from torchft.checkpoint.checkpointer import remove_unfinished_saves

    if is_main:
        remove_unfinished_saves(target.parent)
        return Path(_broadcast(str(temporary_sibling(target))))
    return Path(_broadcast(None))


@contextlib.contextmanager
def shared_atomic_directory(target: Path, is_main: bool):
    """A temporary folder every rank writes into; rank 0 renames it to ``target`` once all are done."""
    from torchft.checkpoint._io import commit_directory

    tmp = shared_temporary_folder(target, is_main)
    try:
        yield tmp
        dist.barrier()  # every rank has written its part before the rename
        if is_main:
            commit_directory(tmp, target)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``rows`` (this rank's part) as a DTensor placed like ``param``, or as is for a whole model."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return DTensor.from_local(rows, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return rows


def _rows_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``full`` (e.g. memory-mapped from the checkpoint) as ``param`` holds them:
    the same split FSDP made (dim 0, over each sharded mesh dimension); all of it for a whole model."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return full
    rows = full
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            mesh = param.device_mesh
            rows = torch.chunk(rows, mesh.size(mesh_dim), dim=0)[mesh.get_local_rank(mesh_dim)]
    return rows.to(_local(param).device)


@torch.no_grad()
def _base_rows(module) -> torch.Tensor:
    """This rank's rows [out / shards, in] of a frozen base weight, dequantized (int8: with its scale rows)."""
    from torchft.modules.peft._nf4 import dequantize

    if module.base_format == "int8":
        return _local(module.dequantized_weight())
    return dequantize(_local(module.weight))


@torch.no_grad()
def merged_state_dict(model: nn.Module, base_weights: Mapping[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """HF-named weights of the model with every adapter merged, as DTensors of this rank's rows.

    Each rank merges its own rows (the base rows plus B's rows times A, DoRA's magnitude rows), so
    nothing is gathered but A [r, in]; the math is ``merge_adapter_weight``'s, one formula for every
    export. ``base_weights``: the original weights (torchft keys, memory-mapped from the checkpoint):
    every frozen tensor is then this rank's rows of it, and adapters merge onto them (a QLoRA export
    is the original plus the update, not the NF4 approximation), as on one device; without it NF4
    and int8 base weights are dequantized.
    """
    from torchft.checkpoint.hf import torchft_to_hf_key
    from torchft.modules.peft import LoRALinear
    from torchft.modules.peft.frozen_linear import FrozenLinear
    from torchft.modules.peft.merge import merge_adapter_weight

    out: dict[str, torch.Tensor] = {}
    adapter_children: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LoRALinear):
            adapter_children.update({prefix + "lora_a", prefix + "lora_b"})
        if module_name in adapter_children:
            continue
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, LoRALinear) and name == "magnitude":
                continue
            original = None
            if base_weights is not None and not param.requires_grad and prefix + name in base_weights:
                original = _rows_of(base_weights[prefix + name], param)  # [rows of this rank, ...]
            if isinstance(module, LoRALinear) and name == "weight":
                magnitude = getattr(module, "magnitude", None)  # DoRA: [out / shards]
                base = original if original is not None else _base_rows(module)  # [out / shards, in]
                rows = merge_adapter_weight(base,
                                            full_tensor(module.lora_a.weight),  # [r, in]
                                            _local(module.lora_b.weight),  # [out / shards, r]
                                            module.scaling, None if magnitude is None else _local(magnitude))
            elif original is not None:
                rows = original
            elif isinstance(module, FrozenLinear) and name == "weight":
                rows = _base_rows(module)
            else:
                rows = _local(param)
            out[torchft_to_hf_key(prefix + name)] = _like(rows.contiguous(), param)
    return out


def write_merged_hf(model: nn.Module, folder: Path, max_shard_size: int | str = "5GB",
                    base_weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the merged model as HF safetensors into ``folder`` (a collective: every rank calls it);
    ``base_weights`` as in :func:`merged_state_dict`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from torchft.checkpoint.hf import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, plan_shards

    state = merged_state_dict(model, base_weights)
    files = plan_shards(state, max_shard_size)  # [[hf key, ...] per file], the HF split
    mapping = {key: i for i, keys in enumerate(files, start=1) for key in keys}
    writer = HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=mapping, save_distributed=True,
                                      enable_consolidation=True)
    dcp.save(state, storage_writer=writer)
    if dist.get_rank() == 0:
        shutil.rmtree(folder / "sharded", ignore_errors=True)  # the per-rank files, now joined
        if len(files) == 1:  # one file: named as a single-device save names it
            (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)
            os.replace(folder / "model-00001-of-00001.safetensors", folder / SAFETENSORS_SINGLE)


# ------------------------------------------------------------------------------------------ DCP state
def _trainable_state(model: nn.Module, optimizer, adapters_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Adapters only: the frozen base is not saved, so loading must not ask for it (DCP itself still
    # fails on any adapter or optimizer entry the checkpoint lacks).
    options = StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optimizer": optim_sd}, options


def save_trainable_state(model: nn.Module, optimizer, folder: Path, adapters_only: bool) -> None:
    """DCP shards of the trainable weights and the optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp

    state, _ = _trainable_state(model, optimizer, adapters_only)
    dcp.save(state, checkpoint_id=str(folder))


def load_trainable_state(model: nn.Module, optimizer, folder: Path, adapters_only: bool) -> None:
    """Load what ``save_trainable_state`` wrote, resharded to this run's world size (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: no distributed checkpoint here (a step folder of a single-device "
                                "run cannot resume a distributed run; start it fresh from that folder's weights)")
    state, options = _trainable_state(model, optimizer, adapters_only)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


# ------------------------------------------------------------------------------------------ step folders
def run_identity(recipe: str, model: nn.Module) -> dict:
    """What must match for a run to resume another: the recipe, the architecture and the adapters."""
    import dataclasses

    from torchft.modules.peft import get_adapter_params

    adapters = sorted(get_adapter_params(model))
    return {"recipe": recipe, "model": dataclasses.asdict(model.args), "adapters": adapters}


def check_same_run(saved: Mapping, current: Mapping, folder) -> None:
    """Refuse, in one line, to resume from a folder another model or method wrote."""
    if saved is None:
        raise ValueError(f"{folder}: not written by a distributed recipe (no run identity); "
                         "start a fresh run from its weights instead")
    for key, what in (("recipe", "recipe"), ("model", "model architecture"), ("adapters", "adapter layout")):
        if saved.get(key) != current[key]:
            raise ValueError(f"{folder} was written by another {what} ({key}: saved {_short(saved.get(key))}, "
                             f"this run {_short(current[key])}); resume from a folder of this run's config")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) < 120 else text[:117] + "..."


class BackgroundSaves:
    """The ``distributed/`` shards of each step folder written in a background thread (``async_save``).

    ``dcp.async_save`` copies the state to new CPU memory before it returns (its default stager
    copies every tensor, CPU ones and the local shards of DTensors included: torch 2.13), so the
    training step that follows may change the weights and the optimizer state while the copy is
    written. The writes and DCP's collectives go over a gloo group of their own, beside the training's.
    ``finish`` waits for the save under way; rank 0 then renames its folder into place. That needs no
    barrier: DCP's last step gathers every rank's write results on rank 0, which writes ``.metadata``,
    and a rank's future succeeds only after that, so rank 0's success means every rank's shards are
    written. Until then the folder keeps its hidden temporary name: a run killed meanwhile leaves
    nothing that ``resume_from_checkpoint=latest`` picks.
    """

    def __init__(self, timeout=None):
        self.group = dist.new_group(backend="gloo", timeout=timeout)  # a collective: every rank, once
        self._pending = None  # (future, temporary folder, step folder, checkpointer, is_main)

    def start(self, state: Mapping, tmp: Path, target: Path, checkpointer, is_main: bool) -> None:
        """Copy ``state`` to CPU memory and write it as DCP shards into ``tmp/distributed`` in the background."""
        import torch.distributed.checkpoint as dcp

        if self._pending is not None:
            raise RuntimeError("a background save is still under way: finish() it first")
        future = dcp.async_save(state, checkpoint_id=str(tmp / DCP_DIR), process_group=self.group)
        self._pending = (future, tmp, target, checkpointer, is_main)

    def finish(self) -> Path | None:
        """Wait for the save under way (on every rank), then rank 0 renames its folder into place and prunes
        the oldest beyond ``keep_last_n``; returns the step folder (None when no save was under way). A
        save that failed on any rank raises here, and its temporary folder is deleted. No rank waits for
        another (so a rank whose own error ends the run can call it): the other ranks may return before
        rank 0 has renamed the folder."""
        from torchft.checkpoint._io import commit_directory

        if self._pending is None:
            return None
        future, tmp, target, checkpointer, is_main = self._pending
        self._pending = None
        try:
            future.result()
        except BaseException:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if is_main:
            commit_directory(tmp, target)
            checkpointer.prune(keep=target)
            log.info("saved %s (written in the background)", target)
        return target


def save_sharded_step(step: int, checkpointer, model: nn.Module, optimizer, recipe_state: Mapping, *,
                      adapters_only: bool, is_main: bool, background: BackgroundSaves | None = None) -> Path:
    """Write ``step_<step>/`` (see the module docstring) from every rank; returns its path.

    ``checkpointer``: the run's ``HFCheckpointer`` (input folder, config, shard size, ``keep_last_n``).
    ``recipe_state``: the small picklable state rank 0 saves in ``training_state.pt``.
    ``background``: write the DCP shards in the background: the previous save is finished first, the
    exports are written now, and ``background.finish()`` renames the folder into place (see
    :class:`BackgroundSaves`).
    """
    target = checkpointer.step_dir(step)
    if background is None:
        with shared_atomic_directory(target, is_main) as tmp:
            save_trainable_state(model, optimizer, tmp / DCP_DIR, adapters_only)
            _write_exports(tmp, checkpointer, model, recipe_state, adapters_only=adapters_only, is_main=is_main)
        if is_main:
            checkpointer.prune(keep=target)
        return target
    background.finish()
    tmp = shared_temporary_folder(target, is_main)
    try:
        _write_exports(tmp, checkpointer, model, recipe_state, adapters_only=adapters_only, is_main=is_main)
        background.start(_trainable_state(model, optimizer, adapters_only)[0], tmp, target, checkpointer, is_main)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_exports(tmp: Path, checkpointer, model: nn.Module, recipe_state: Mapping, *, adapters_only: bool,
                   is_main: bool) -> None:
    """Everything of a step folder but ``distributed/``: the merged HF model (every rank its rows), and from
    rank 0 ``config.json``, the tokenizer files, ``adapter/`` and ``training_state.pt`` (a collective)."""
    from torchft.checkpoint.checkpointer import ADAPTER_DIR, TRAINING_STATE_FILE
    from torchft.checkpoint.hf import CONFIG_FILE
    from torchft.checkpoint.peft import save_peft_adapter
    from torchft.checkpoint import copy_support_files
    from torchft.modules.peft import get_adapter_params

    # adapters merge onto the checkpoint's own weights (memory-mapped, this rank's rows read), unless
    # checkpointer.merge_onto is "model" (QLoRA: onto the dequantized NF4 weights)
    onto_checkpoint = adapters_only and checkpointer.merge_onto == "checkpoint"
    base = checkpointer.load_model_state_dict() if onto_checkpoint else None
    write_merged_hf(model, tmp, checkpointer.max_shard_size, base)
    adapters = {name: full_tensor(p.detach()).cpu() for name, p in get_adapter_params(model).items()}
    if is_main:
        (tmp / CONFIG_FILE).write_text(json.dumps(checkpointer.hf_config, indent=2, sort_keys=True) + "\n")
        copy_support_files(checkpointer.checkpoint_dir, tmp)
        if adapters:
            base = checkpointer.base_model_name_or_path or str(checkpointer.checkpoint_dir.resolve())
            save_peft_adapter(model, tmp / ADAPTER_DIR, base_model_name_or_path=base, adapter_state_dict=adapters)
        torch.save(dict(recipe_state), tmp / TRAINING_STATE_FILE)


def recipe_state(step: int, lr_scheduler, loader, run: Mapping, global_batch_size: int) -> dict:
    """What rank 0 keeps in ``training_state.pt`` beside the DCP shards (every rank's RNG is the same:
    all start from one seed and draw alike)."""
    from torchft.training.rng import get_rng_state

    return {"step": int(step), "lr_scheduler": lr_scheduler.state_dict(), "dataloader": loader.state_dict(),
            "rng": get_rng_state(), "run": dict(run), "global_batch_size": int(global_batch_size)}


def restore_recipe_state(state: Mapping, lr_scheduler, loader, global_batch_size: int) -> int:
    """Put the LR schedule, data position and RNG back; returns the step to continue after.

    The data position is counted in global batches, so it carries over to another world size as long
    as the global ``batch_size`` is the same.
    """
    from torchft.training.rng import set_rng_state
    from torchft.training.state import restore_lr_schedule

    if state.get("global_batch_size") != global_batch_size:
        raise ValueError(f"cannot resume the data order: saved batch_size={state.get('global_batch_size')} "
                         f"but this run has batch_size={global_batch_size}")
    data = {**state["dataloader"], "batch_size": loader.batch_size, "world_size": loader.world_size}
    loader.load_state_dict(data)
    restore_lr_schedule(lr_scheduler, state["lr_scheduler"], is_main_process=not dist.is_initialized()
                        or dist.get_rank() == 0)
    set_rng_state(state["rng"])
    return int(state["step"])
