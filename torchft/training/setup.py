"""Setting a run up: checks made before any training starts, and loading weights into a built model."""
import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# The LlamaArgs fields that decide the shapes (and the RoPE) of the weights.
_ARCHITECTURE_FIELDS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim",
                        "head_dim", "tie_word_embeddings", "attn_bias", "mlp_bias", "rope_base")


def check_output_dir_writable(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` if needed and prove it is writable, before any training time is spent."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"output_dir ({output_dir}) is not writable: {err.strerror or err}") from err
    return path


def check_positive(name: str, value) -> None:
    """``batch_size (0) must be a positive integer``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value}) must be a positive integer")


def check_same_architecture(model_args, checkpoint_args, checkpoint_dir) -> None:
    """The model the config builds must have the shapes of the checkpoint it loads."""
    diffs = [f"{name} {getattr(model_args, name)} vs {getattr(checkpoint_args, name)}"
             for name in _ARCHITECTURE_FIELDS if getattr(model_args, name) != getattr(checkpoint_args, name)]
    if diffs:
        raise ValueError(f"checkpointer.checkpoint_dir ({checkpoint_dir}) holds another architecture than the "
                         f"config's model (model vs checkpoint: {', '.join(diffs)})")


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


def check_fresh_output_dir(output_dir, resuming: bool, overwrite: bool, log) -> None:
    """A fresh run must not share ``output_dir`` with an earlier run's step folders: ``keep_last_n``
    would prune the two runs' folders together and ``resume_from_checkpoint=latest`` could pick the
    other run's. Refuse, naming the ways out; with ``overwrite`` the earlier folders are deleted first."""
    import shutil

    from torchft.checkpoint.checkpointer import step_dirs

    earlier = [path for _, path in step_dirs(output_dir)]
    if resuming or not earlier:
        return
    if not overwrite:
        names = ", ".join(p.name for p in earlier[-3:])
        raise FileExistsError(
            f"output_dir ({output_dir}) already holds {names} from an earlier run: continue it with "
            f"resume_from_checkpoint=latest, delete its step folders with overwrite_output_dir=true, "
            f"or choose another output_dir")
    log.warning("overwrite_output_dir=true: deleting %d step folder(s) of an earlier run in %s", len(earlier),
                output_dir)
    for path in earlier:
        shutil.rmtree(path)
