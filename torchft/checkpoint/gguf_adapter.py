"""Export a PEFT LoRA adapter (a step folder's ``adapter/``) as a GGUF LoRA file for llama.cpp's ``--lora``.

llama.cpp applies such a file on top of the base model's GGUF at load time (``llama-cli -m base.gguf
--lora adapter.gguf``) or merges it (``llama-export-lora``). The file is small: only the adapter matrices.

What llama.cpp reads (facts of its LoRA format):
- metadata ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and the base's
  ``general.architecture`` (``llama``); the scale it applies is ``alpha / rank``, PEFT's own scaling;
- for each adapted weight ``W`` named ``blk.N.attn_q.weight`` (see ``gguf_tensor_name``), two tensors
  ``blk.N.attn_q.weight.lora_a`` with PyTorch shape [rank, in] and ``...lora_b`` with shape [out, rank],
  so that ``W' = W + alpha / rank * lora_b @ lora_a``.
The base GGUF's q/k rows are permuted to llama.cpp's interleaved rotary order; ``lora_b`` of q/k gets the
same row permutation (``lora_a`` acts on the input, whose order does not change).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from torchft.checkpoint._io import CheckpointError, atomic_file

ADAPTER_DTYPES = ("f32", "f16", "bf16")


def _base_config_dir(adapter_dir: Path) -> Path:
    """The folder with the base model's ``config.json``: the step folder given, or the adapter's parent."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"{adapter_dir}: no config.json beside the adapter; give the step_<N> folder, whose "
                          "config.json names the model's heads")


def export_gguf_adapter(checkpoint_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write the LoRA adapter of a step folder as a GGUF LoRA file (llama.cpp's ``--lora``).

    Args:
        checkpoint_dir: a ``step_<N>/`` folder (its ``adapter/`` and ``config.json`` are read) or the
            ``adapter/`` folder itself inside one.
        output: the ``.gguf`` file, written under a temporary name and renamed into place when complete.
        dtype: ``f32``, ``f16`` (default) or ``bf16`` for the adapter matrices.

    DoRA adapters are refused (llama.cpp's LoRA format has no magnitude vector): export the merged model.
    """
    import gguf
    from safetensors.torch import load_file

    from torchft.checkpoint.gguf import _tensor_data, gguf_tensor_name, interleave_rotary
    from torchft.checkpoint.hf import load_hf_args
    from torchft.checkpoint.peft import (ADAPTER_WEIGHTS_NAME, from_peft_key, read_peft_adapter_config,
                                         resolve_adapter_dir)

    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(ADAPTER_DTYPES)} for --adapter-only "
                         "(the adapter matrices have rank-sized rows, too short for q8_0 blocks)")
    adapter_dir = resolve_adapter_dir(checkpoint_dir)
    config = read_peft_adapter_config(adapter_dir)
    if config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: a DoRA adapter has no llama.cpp LoRA form; export the merged model "
                         "(tune export without --adapter-only)")
    args = load_hf_args(_base_config_dir(adapter_dir))
    weights_path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: no such file; expected the adapter's weights beside its config")
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give the .gguf file to write")
    output.parent.mkdir(parents=True, exist_ok=True)

    tensors = {}  # gguf name -> tensor, in the order of the adapter file
    for peft_key, tensor in load_file(weights_path).items():
        parsed = from_peft_key(peft_key)
        if parsed is None or parsed[1]:
            raise CheckpointError(f"{weights_path}: {peft_key} is not a LoRA matrix of a Llama linear layer")
        key = parsed[0]  # e.g. layers.0.self_attn.q_proj.lora_b.weight
        module, kind = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]  # "layers.0.self_attn.q_proj", "lora_b"
        if kind == "lora_b" and module.endswith("self_attn.q_proj"):
            tensor = interleave_rotary(tensor, args.num_heads)  # [out, rank]: rows as the base GGUF's
        elif kind == "lora_b" and module.endswith("self_attn.k_proj"):
            tensor = interleave_rotary(tensor, args.num_kv_heads)
        tensors[f"{gguf_tensor_name(module + '.weight')}.{kind}"] = tensor

    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        writer.add_name(f"{adapter_dir.resolve().parent.name} LoRA")
        for name, tensor in tensors.items():
            if dtype == "f32":
                writer.add_tensor(name, tensor.detach().to(torch.float32).numpy())
            else:
                data, kind = _tensor_data(name, tensor, dtype)
                writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output


__all__ = ["ADAPTER_DTYPES", "export_gguf_adapter"]
