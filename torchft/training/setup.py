"""Setting a run up: checks made before any training starts, and loading weights into a built model."""
import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# The LlamaArgs fields that decide the shapes (and the RoPE) of the weights.
_ARCHITECTURE_FIELDS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim",
                        "head_dim", "tie_word_embeddings", "attn_bias", "mlp_bias", "rope_base")


def output_dir_problem(output_dir: str | os.PathLike) -> str | None:
    """Why ``output_dir`` could not be written, or None. Nothing is created: a run refused at start
    leaves no folder behind (the folder is made when the run first writes to it)."""
    path = Path(output_dir)
    existing = path
    while not existing.exists():  # the deepest folder that exists: the new ones are made inside it
        existing = existing.parent
    if not existing.is_dir():
        return f"output_dir ({output_dir}) is not writable: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir ({output_dir}) is not writable: no write permission on {existing}"
    return None


def positive_int_problem(name: str, value) -> str | None:
    """``batch_size (0) must be a positive integer``, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{name} ({value}) must be a positive integer"
    return None


def run_length_problems(max_steps, epochs) -> list[str]:
    """The run's length: ``max_steps`` a positive integer, ``epochs`` a number > 0, one of them set."""
    problems = []
    if max_steps is not None:
        problems.append(positive_int_problem("max_steps", max_steps))
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
        problems.append(f"epochs ({epochs}) must be a number > 0")
    if max_steps is None and epochs is None:
        problems.append("set max_steps or epochs (or both: the run stops at whichever comes first)")
    return [problem for problem in problems if problem]


def check_same_architecture(model_args, checkpoint_args, checkpoint_dir) -> None:
    """The model the config builds must have the shapes of the checkpoint it loads."""
    diffs = [f"{name} {getattr(model_args, name)} vs {getattr(checkpoint_args, name)}"
             for name in _ARCHITECTURE_FIELDS if getattr(model_args, name) != getattr(checkpoint_args, name)]
    if diffs:
        raise ValueError(f"checkpointer.checkpoint_dir ({checkpoint_dir}) holds another architecture than the "
                         f"config's model (model vs checkpoint: {', '.join(diffs)}); point it at a checkpoint of "
                         f"this model, or build the model from the folder's config.json with the overrides "
                         f"model=torchft.models.from_hf_config +model.path_or_dict={checkpoint_dir} "
                         f"(and +model.quantize_base=true for QLoRA)")


def check_tokenizer_fits(tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_path) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    if tokenizer_vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer.path ({tokenizer_path}) has a vocabulary of {tokenizer_vocab_size} tokens, "
                         f"larger than the model's vocab_size ({model_vocab_size})")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside the block take ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], device: torch.device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors to ``dtype`` on ``device``."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state_dict.items()}


def _piece_of(key: str) -> str:
    """The submodule a key is loaded through: ``layers.3`` for a layer's weights, else the first name."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def load_in_pieces(model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device,
                   dtype: torch.dtype) -> None:
    """Assign ``state_dict`` (e.g. memory-mapped on the CPU) into a model built on ``meta``, one piece
    (the embedding, each decoder layer, the norm, the output) at a time.

    Only one piece is ever converted to ``dtype`` on ``device`` beyond the model itself, so loading an
    8B model never holds a second copy on the GPU, and QLoRA layers quantize to NF4 as each layer
    arrives. Keys must have been checked against the model before (missing keys stay on ``meta``).
    """
    pieces: dict[str, list[str]] = {}
    for key in state_dict:
        pieces.setdefault(_piece_of(key), []).append(key)
    for piece, keys in pieces.items():
        module = model.get_submodule(piece)
        offset = len(piece) + 1
        module.load_state_dict(cast_state_dict({k[offset:]: state_dict[k] for k in keys}, device, dtype),
                               strict=False, assign=True)


def load_full_model(model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device,
                    dtype: torch.dtype) -> nn.Module:
    """Load every weight of a model built on ``meta`` (no key missing or unexpected)."""
    from torchft.modules.peft import state_dict_keys

    expected = set(state_dict_keys(model))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}")
    if problems:
        raise ValueError(f"checkpoint does not match the model: {'; '.join(problems)}")
    load_in_pieces(model, state_dict, device, dtype)
    _check_materialized(model)
    return model


def load_adapter_model(model: nn.Module, base_state_dict: Mapping[str, torch.Tensor], device: torch.device,
                       dtype: torch.dtype, adapter_state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Load base weights into a LoRA/DoRA/QLoRA model built on ``meta``, then its adapters.

    ``adapter_state_dict`` (a resumed run's adapters, torchft names) is loaded as is; otherwise the
    adapters start fresh (A Kaiming-uniform, B zero, DoRA magnitudes from the loaded base weights).
    Only the adapter parameters stay trainable.
    """
    from torchft.modules.peft import (get_adapter_params, initialize_adapters, load_adapter_state_dict,
                                      set_trainable_params, validate_lora_state_dict)

    validate_lora_state_dict(model, base_state_dict, kind="base")  # only adapter keys may be missing
    load_in_pieces(model, base_state_dict, device, dtype)
    if adapter_state_dict is not None:
        load_adapter_state_dict(model, cast_state_dict(adapter_state_dict, device, dtype))
    initialize_adapters(model, device)
    set_trainable_params(model, get_adapter_params(model))
    _check_materialized(model)
    return model


def _check_materialized(model: nn.Module) -> None:
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(f"weights not loaded (still on meta): {', '.join(on_meta[:5])}")


def model_args_summary(args) -> str:
    """``layers 2, dim 64, heads 4/2, ...`` for the log."""
    fields = dataclasses.asdict(args)
    return ", ".join(f"{k} {fields[k]}" for k in ("num_layers", "embed_dim", "num_heads", "num_kv_heads",
                                                  "intermediate_dim", "vocab_size"))


def fresh_output_dir_problem(output_dir, resuming: bool, overwrite: bool) -> str | None:
    """A fresh run must not share ``output_dir`` with an earlier run's step folders: ``keep_last_n``
    would prune the two runs' folders together and ``resume_from_checkpoint=latest`` could pick the
    other run's. The refusal names the ways out; ``overwrite`` lets the run delete them (see
    :func:`delete_earlier_steps`, called once every start check has passed)."""
    from torchft.checkpoint.checkpointer import step_dirs

    earlier = [path for _, path in step_dirs(output_dir)]
    if resuming or overwrite or not earlier:
        return None
    names = ", ".join(p.name for p in earlier[-3:])
    return (f"output_dir ({output_dir}) already holds {names} from an earlier run: continue it with "
            f"resume_from_checkpoint=latest, delete its step folders with overwrite_output_dir=true, "
            f"or choose another output_dir")


def delete_earlier_steps(output_dir, log) -> None:
    """``overwrite_output_dir=true``: delete the step folders an earlier run left in ``output_dir``."""
    import shutil

    from torchft.checkpoint.checkpointer import step_dirs

    earlier = [path for _, path in step_dirs(output_dir)]
    if not earlier:
        return
    log.warning("overwrite_output_dir=true: deleting %d step folder(s) of an earlier run in %s", len(earlier),
                output_dir)
    for path in earlier:
        shutil.rmtree(path)


def start_writing(cfg, output_dir, metric_logger, *, overwrite: bool, resumed_step: int | None, log,
                  is_main_process: bool = True) -> None:
    """Called once every start check has passed, right before training: only now does the run write.

    A fresh run with ``overwrite`` first deletes an earlier run's step folders; a run resumed from
    ``resumed_step`` sets aside the later step folders of the run it abandons (both on the main process
    only). Then the resolved config goes to ``<output_dir>/torchft_config.yaml`` and to the metric
    logger. A run refused before this point has changed nothing, not even the saved config of the run
    it met.
    """
    from omegaconf import OmegaConf

    from torchft.checkpoint import set_aside_later_steps
    from torchft.config import log_and_save_config

    if is_main_process and overwrite and resumed_step is None:
        delete_earlier_steps(output_dir, log)
    if is_main_process and resumed_step is not None:  # runs never mix: later folders go aside, kept
        set_aside_later_steps(output_dir, resumed_step)
    log_and_save_config(cfg, output_dir)
    metric_logger.log_config(OmegaConf.to_container(cfg, resolve=True))
