"""Checkpoint formats and the recipes' checkpointers.

- HF: ``load_hf_checkpoint`` / ``save_hf_checkpoint`` (safetensors shards + index, .bin read too)
- Meta: ``load_meta_checkpoint`` / ``save_meta_checkpoint`` (``consolidated.00.pth`` + ``params.json``)
- native single file: ``load_native_checkpoint`` / ``save_native_checkpoint``
- PEFT adapters: ``save_peft_adapter`` / ``load_peft_adapter``
- recipes: ``HFCheckpointer``, ``MetaCheckpointer``, ``latest_step_dir``, ``resolve_resume_dir``,
  ``set_aside_later_steps``
- writing step folders: ``atomic_directory`` (written aside, renamed into place), ``copy_support_files``;
  a folder written in the background: ``temporary_sibling`` (where to write it), ``commit_directory``
  (rename it into place once complete)

Names are imported on first use, so importing this package stays cheap and a problem in one
module never breaks the others.
"""
import importlib

_EXPORTS = {
    "CheckpointError": "_io",
    "atomic_directory": "_io",
    "copy_support_files": "_io",
    "temporary_sibling": "_io",
    "commit_directory": "_io",
    "load_hf_checkpoint": "hf",
    "save_hf_checkpoint": "hf",
    "load_hf_args": "hf",
    "read_hf_config": "hf",
    "load_meta_checkpoint": "meta",
    "save_meta_checkpoint": "meta",
    "load_meta_args": "meta",
    "load_native_checkpoint": "native",
    "save_native_checkpoint": "native",
    "check_state_dict": "validate",
    "load_state_dict_strict": "validate",
    "HFCheckpointer": "checkpointer",
    "MetaCheckpointer": "checkpointer",
    "latest_step_dir": "checkpointer",
    "resolve_resume_dir": "checkpointer",
    "set_aside_later_steps": "checkpointer",
    "load_training_state": "checkpointer",
    "load_peft_adapter": "peft",
    "save_peft_adapter": "peft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
