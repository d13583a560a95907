"""``tune export``: a step folder (or any Llama HF folder) to an inference engine's file format."""
from __future__ import annotations

import argparse
import importlib.util

from torchft.cli._common import add_subcommand

FORMATS = ("gguf", "executorch")

EPILOG = """\
examples:
  tune export --checkpoint_dir out/step_500 --format gguf --dtype q8_0 --output model-q8_0.gguf
  llama-cli -m model-q8_0.gguf        (llama.cpp; `ollama create` takes the file too)
  tune export --checkpoint_dir out/step_500 --adapter-only --output adapter.gguf
  llama-cli -m base.gguf --lora adapter.gguf
  tune export --checkpoint_dir out/step_500 --format executorch --dtype 8da4w --output model.pte

gguf: architecture llama with llama.cpp's tensor names, the tokenizer, special tokens and chat template
embedded; --dtype f16, bf16 or q8_0 for the matrices (norms stay f32). A LoRA step folder exports its
merged weights; with --adapter-only it writes just the adapter as a GGUF LoRA file instead, for
llama.cpp's --lora beside the base model's GGUF (--dtype f32, f16 or bf16). The file is written under a
temporary name and renamed when complete.
executorch: a .pte for the XNNPACK CPU backend with the LLM runner's methods (forward(tokens,
input_pos) with the KV cache inside); --dtype fp32 or 8da4w (int8 dynamic activations, int4 weights in
groups of 32). Needs the executorch package: pip install -e ".[executorch]".
exit status: 0 when written, 1 with one line naming the problem otherwise.
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "export",
        help="write a model folder as a GGUF file (llama.cpp, Ollama) or an ExecuTorch program",
        description="Export a Llama HF folder (a step folder) to an inference engine's format.",
        epilog=EPILOG,
    )
    parser.add_argument("--checkpoint_dir", required=True, help="the HF folder to export (e.g. <output_dir>/step_<N>)")
    parser.add_argument("--format", default="gguf", help=f"one of {', '.join(FORMATS)} (default gguf)")
    parser.add_argument("--dtype", default=None,
                        help="gguf: f16 (default), bf16 or q8_0; with --adapter-only f32, f16 or bf16; "
                             "executorch: fp32 (default) or 8da4w")
    parser.add_argument("--output", required=True, help="the file to write")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="executorch: positions its KV cache holds (default the model's, at most 2048)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="gguf: write only the LoRA adapter of a step folder (llama.cpp --lora)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
    if args.format == "executorch":
        if args.adapter_only:
            raise ValueError("--adapter-only is for --format gguf; an ExecuTorch program holds the merged model")
        if importlib.util.find_spec("executorch") is None:
            from torchft.generation._executorch import install_hint

            raise ValueError(install_hint())
        from torchft.generation._executorch import export_executorch

        dtype = args.dtype or "fp32"
        path = export_executorch(args.checkpoint_dir, args.output, dtype=dtype, max_seq_len=args.max_seq_len)
    elif args.adapter_only:
        from torchft.checkpoint.gguf_adapter import export_gguf_adapter

        dtype = args.dtype or "f16"
        path = export_gguf_adapter(args.checkpoint_dir, args.output, dtype=dtype)
    else:
        from torchft.checkpoint.gguf import export_gguf

        dtype = args.dtype or "f16"
        path = export_gguf(args.checkpoint_dir, args.output, dtype=dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {dtype})")
    return 0
