"""Activation memory per token per decoder layer: torchft next to torchtune 0.6.1 and HF transformers + PEFT.

Device-independent accounting, the same for everyone: a ``saved_tensors_hooks`` pack hook sees every
tensor autograd keeps for backward during one forward pass; the bytes of the unique storages that are
not parameters are summed. The model is built with 1 and with 3 decoder layers (random weights, bf16,
LoRA rank 16 on every linear layer of the decoder, 1 x 512 tokens) and the figure is
``(bytes(3 layers) - bytes(1 layer)) / 2 / tokens``: embedding and loss cancel out.

    python benchmarks/activation_memory.py                  # torchft, torchtune, HF+PEFT; 1B and 8B shapes
    python benchmarks/activation_memory.py --peer torchft --shape 1b --ac
    python benchmarks/activation_memory.py --shapes 1b --modes compiled   # part of the table
    python benchmarks/activation_memory.py --dpo                 # torchft: DPO beside SFT (1B, 8B shapes)
    python benchmarks/activation_memory.py --dpo --shape tiny --tokens 64   # the CPU-tiny mode of the test

torchtune is measured when it imports (``TORCHTUNE_PYTHON=/path/to/python`` names an interpreter
that has it; each peer runs in its own process). Prints one JSON line per figure, then a table.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from peer_harness import peer_harness_dir

REPO = Path(__file__).resolve().parents[1]

PEER_HARNESS_DIR = peer_harness_dir()

# Decoder-layer shapes of Llama-3.2-1B and Llama-3.1-8B (vocabulary kept small: it cancels out).
LAYER_SHAPES = {
    "1b": dict(dim=2048, heads=32, kv=8, hidden=8192),
    "8b": dict(dim=4096, heads=32, kv=8, hidden=14336),
    "tiny": dict(dim=64, heads=4, kv=2, hidden=128),
}
VOCAB = 1024
LORA_RANK, LORA_ALPHA = 16, 32.0


def saved_activation_bytes(run, params) -> int:
    """Bytes of the unique non-parameter storages that autograd saves while ``run()`` executes."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}
    keep_alive = []  # holding the tensors keeps their storage addresses unique

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
            keep_alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _torchft(num_layers: int, shape: dict, checkpointing: bool):
    from torchft.models import llama
    from torchft.modules.peft import get_adapter_params, set_trainable_params
    from torchft.training.activations import apply_activation_checkpointing

    torch.set_default_dtype(torch.bfloat16)
    model = llama(vocab_size=VOCAB, num_layers=num_layers, num_heads=shape["heads"], num_kv_heads=shape["kv"],
                  embed_dim=shape["dim"], intermediate_dim=shape["hidden"], max_seq_len=4096, rope_base=500000.0,
                  lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True,
                  lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)
    torch.set_default_dtype(torch.float32)
    set_trainable_params(model, get_adapter_params(model))
    if checkpointing:
        apply_activation_checkpointing(model)
    return model, lambda tokens: model.hidden_states(tokens)


def _peer_shape(num_layers: int, shape: dict) -> dict:
    return dict(vocab=VOCAB, dim=shape["dim"], layers=num_layers, heads=shape["heads"], kv=shape["kv"],
                hidden=shape["hidden"], tied=True)


def _torchtune(num_layers: int, shape: dict, checkpointing: bool):
    sys.path.insert(0, str(PEER_HARNESS_DIR))
    import bench_peers  # the shared peer harness builds the peers' models

    bench_peers.SHAPES["tiny"] = _peer_shape(num_layers, shape)  # its component-builder path takes any dims
    model = bench_peers.tt_model("tiny", "lora")
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        from torchtune.modules import TransformerSelfAttentionLayer

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerSelfAttentionLayer))
    return model, lambda tokens: model(tokens)


def _hf_peft(num_layers: int, shape: dict, checkpointing: bool):
    sys.path.insert(0, str(PEER_HARNESS_DIR))
    import bench_peers

    bench_peers.SHAPES["accounting"] = _peer_shape(num_layers, shape)
    model, forward = bench_peers.hf_peft("accounting")()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model, lambda tokens: forward(model, tokens)


PEERS = {"torchft": _torchft, "torchtune": _torchtune, "hf_peft": _hf_peft}


def dpo_rows(shape: str, tokens: int = 512) -> dict:
    """DPO beside SFT in torchft (the ``--dpo`` rows), for one layer shape:

    - ``sft`` / ``dpo``: KiB kept for backward per token per decoder layer by an SFT forward and by a DPO
      micro-batch (the reference's forward, without gradients, then the policy's), the same accounting as
      the table. A pair is two sequences, so a DPO step of b pairs keeps this per token over 2b sequences.
    - ``*_param_bytes``: bytes of unique parameter storages held by the policy and its reference (3 layers):
      LoRA's reference is the policy with adapters off (no storage of its own), full DPO's a frozen copy.
    """
    import copy

    from torchft.modules.peft import disable_adapter

    figures = {"sft": [], "dpo": []}
    params = {}
    for num_layers in (1, 3):
        torch.manual_seed(0)
        model, forward = _torchft(num_layers, LAYER_SHAPES[shape], False)
        ids = torch.randint(0, VOCAB, (1, tokens))

        def dpo_micro_batch():
            with torch.no_grad(), disable_adapter(model):
                forward(ids)  # the reference: nothing is kept for backward
            return forward(ids)

        figures["sft"].append(saved_activation_bytes(lambda: forward(ids), model.parameters()))
        figures["dpo"].append(saved_activation_bytes(dpo_micro_batch, model.parameters()))
        if num_layers == 3:
            frozen_copy = copy.deepcopy(model)
            unique = lambda *models: sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()  # noqa: E731
                                          for m in models for p in m.parameters()}.values())
            params = dict(policy_param_bytes=unique(model), lora_policy_and_reference_param_bytes=unique(model, model),
                          full_policy_and_reference_param_bytes=unique(model, frozen_copy))
        del model
    per_layer = {k: (v[1] - v[0]) / 2 / tokens / 1024 for k, v in figures.items()}
    return dict(shape=shape, sft_kib_per_token_per_layer=round(per_layer["sft"], 2),
                dpo_kib_per_token_per_layer=round(per_layer["dpo"], 2), **params)


def kib_per_token_per_layer(peer: str, shape: str, tokens: int = 512, checkpointing: bool = False,
                            compiled: bool = False) -> float:
    """The figure of the module docstring for one peer and one layer shape."""
    totals = []
    for num_layers in (1, 3):
        torch.manual_seed(0)
        model, forward = PEERS[peer](num_layers, LAYER_SHAPES[shape], checkpointing)
        if compiled:
            layers = model.layers if hasattr(model, "layers") else model.base_model.model.model.layers
            for layer in layers:
                layer.compile()
        ids = torch.randint(0, VOCAB, (1, tokens))
        totals.append(saved_activation_bytes(lambda: forward(ids), model.parameters()))
        del model
    return (totals[1] - totals[0]) / 2 / tokens / 1024


def _measure_in_subprocess(python: str, peer: str, shape: str, tokens: int, checkpointing: bool,
                           compiled: bool) -> dict:
    cmd = [python, __file__, "--peer", peer, "--shape", shape, "--tokens", str(tokens), "--json"]
    cmd += ["--ac"] if checkpointing else []
    cmd += ["--compiled"] if compiled else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return dict(peer=peer, shape=shape, ac=checkpointing, compiled=compiled,
                    error=(proc.stderr.strip().splitlines() or ["failed"])[-1][:200])
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=list(PEERS), help="measure one peer in this process")
    parser.add_argument("--shape", choices=list(LAYER_SHAPES), default="1b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--ac", action="store_true", help="with activation checkpointing")
    parser.add_argument("--compiled", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--shapes", nargs="+", choices=["1b", "8b"], default=["1b", "8b"], help="table: layer shapes")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                        help="table: eager and/or compiled layers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dpo", action="store_true", help="torchft only: DPO beside SFT (see dpo_rows)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    if args.dpo:
        for shape in ["tiny"] if args.shape == "tiny" else args.shapes:
            print(json.dumps(dpo_rows(shape, args.tokens)), flush=True)
        return

    if args.peer:
        figure = kib_per_token_per_layer(args.peer, args.shape, args.tokens, args.ac, args.compiled)
        print(json.dumps(dict(peer=args.peer, shape=args.shape, ac=args.ac, compiled=args.compiled,
                              kib_per_token_per_layer=round(figure, 1))))
        return

    pythons = {"torchft": sys.executable, "hf_peft": sys.executable,
               "torchtune": os.environ.get("TORCHTUNE_PYTHON", sys.executable)}
    rows = []
    for shape in args.shapes:
        for compiled in [mode == "compiled" for mode in args.modes]:
            for checkpointing in (False, True):
                for peer in PEERS:
                    row = _measure_in_subprocess(pythons[peer], peer, shape, args.tokens, checkpointing, compiled)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(f"\nKiB kept for backward per token per decoder layer (bf16, LoRA r{LORA_RANK} on all linear layers, "
          f"1 x {args.tokens} tokens, torch {torch.__version__})\n")
    print("| layer shape | mode | AC | torchft | torchtune 0.6.1 | HF + PEFT |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(rows), len(PEERS)):
        group = rows[i:i + len(PEERS)]
        cells = [f"{r['kib_per_token_per_layer']}" if "error" not in r else f"n/a ({r['error']})" for r in group]
        first = group[0]
        mode = "compiled" if first["compiled"] else "eager"
        print(f"| {first['shape']} | {mode} | {'yes' if first['ac'] else 'no'} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
