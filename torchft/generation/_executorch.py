"""Export an HF step folder to an ExecuTorch program (``.pte``) for the XNNPACK CPU backend.

The program has the method contract of ExecuTorch's LLM runner (``executorch.extension.llm.runner``,
the C++ ``llama_main`` and the mobile apps): ``forward(tokens [1, s] long, input_pos [1] long) -> logits
[1, vocab]`` of the last position, one method for prefill (any ``s`` up to ``max_seq_len``) and decode
(``s = 1``), with the KV cache held inside the program; plus the constant methods the runner reads
(``get_max_seq_len``, ``get_bos_id``, ``get_eos_ids``, ``use_kv_cache``, ...).

``input_pos`` is where ``tokens`` start, so the runner can restart a sequence at 0 without resetting
anything: the cache is written at those positions and attention sees the positions before them.
Quantization ``8da4w`` (int8 dynamic per-token activations, int4 weights in groups of 32) goes through
torchao, as XNNPACK runs it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PTE_DTYPES = ("fp32", "8da4w")
GROUP_SIZE = 32  # 8da4w weight groups (columns sharing one scale)


def install_hint() -> str:
    return ("--format executorch needs the executorch package: pip install -e \".[executorch]\" (or pip "
            "install executorch; it brings its own omegaconf<2.4, which torchft works with)")


class ExecutorchLlama(nn.Module):
    """The runner's view of a torchft Llama with KV caches: ``forward(tokens, input_pos)``.

    Args:
        model: a torchft Llama whose caches are set up (``model.setup_caches(1, dtype, max_seq_len)``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.caches = [layer.self_attn.kv_cache for layer in model.layers]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens: [1, s] long; input_pos: [1] long, the position of ``tokens[0, 0]`` -> logits [1, vocab]."""
        for cache in self.caches:
            cache._size.copy_(input_pos[0])  # write at input_pos; attend to every slot before it
        positions = (input_pos + torch.arange(tokens.shape[1]))[None]  # [1, s]
        hidden = self.model.hidden_states(tokens, input_pos=positions)  # [1, s, dim]
        return self.model.output(hidden[:, -1])  # [1, vocab]: the runner samples from the last position


def prepare_model(checkpoint_dir: str | os.PathLike, dtype: str, max_seq_len: int) -> ExecutorchLlama:
    """Load the folder's (merged) model in fp32, quantize it for ``dtype`` and set up a batch-1 KV cache."""
    from torchft.generation._loading import load_model

    model = load_model(checkpoint_dir, dtype=torch.float32)
    if dtype == "8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        bad = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE]
        if bad:
            raise ValueError(f"8da4w needs linear inputs in multiples of {GROUP_SIZE}; {bad[0]} has "
                             f"{model.get_submodule(bad[0]).in_features}")
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                               weight_granularity=PerGroup(GROUP_SIZE)))
    model.setup_caches(1, torch.float32, max_seq_len=max_seq_len)
    return ExecutorchLlama(model).eval()


def export_executorch(checkpoint_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp32",
                      max_seq_len: int | None = None) -> Path:
    """Write the Llama model of an HF folder (a step folder) as an ExecuTorch program for XNNPACK.

    Args:
        checkpoint_dir: ``config.json``, safetensors weights and tokenizer files (a LoRA step folder
            exports its merged weights).
        output: the ``.pte`` to write, under a temporary name renamed into place when complete.
        dtype: ``fp32`` or ``8da4w`` (torchao int8 dynamic activations + int4 grouped weights).
        max_seq_len: positions the program's KV cache holds (prompt + generated); default the model's
            context length, at most 2048 (the cache is part of the program's memory).
    """
    from torchft.checkpoint._io import atomic_file, require_dir
    from torchft.checkpoint.hf import load_hf_args
    from torchft.data.tokenizers import model_tokenizer

    if dtype not in PTE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(PTE_DTYPES)} for --format executorch")
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    except ImportError:
        raise ValueError(install_hint()) from None
    folder = require_dir(checkpoint_dir, "checkpoint_dir")
    args = load_hf_args(folder)
    max_seq_len = max_seq_len or min(args.max_seq_len, 2048)
    if not 1 < max_seq_len <= args.max_seq_len:
        raise ValueError(f"max_seq_len {max_seq_len} must be between 2 and the model's {args.max_seq_len}")
    tokenizer = model_tokenizer(str(folder))  # the ids the runner needs; fails early without tokenizer files
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give the .pte file to write")

    program = prepare_model(folder, dtype, max_seq_len)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    # Prefill takes up to max_seq_len - 1 tokens (the runner keeps one position to generate into).
    tokens_dim = torch.export.Dim("tokens", min=1, max=max_seq_len - 1)
    with torch.no_grad():
        exported = torch.export.export(program, example, dynamic_shapes=({1: tokens_dim}, None), strict=False)
    constants = {
        "get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len, "get_vocab_size": args.vocab_size,
        "get_n_layers": args.num_layers, "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True, "get_eos_ids": sorted(tokenizer.stop_tokens),
    }
    if tokenizer.bos_id is not None:
        constants["get_bos_id"] = tokenizer.bos_id
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()], constant_methods=constants)
    # The caches start as zeros in the program (unwritten slots are masked, but 0 * NaN would not be).
    lowered = edge.to_executorch(ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["kv_cache"])]))
    with atomic_file(output) as tmp:
        tmp.write_bytes(lowered.buffer)
    return output


__all__ = ["ExecutorchLlama", "PTE_DTYPES", "export_executorch", "install_hint", "prepare_model"]
