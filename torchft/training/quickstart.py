"""The quickstart's base model: a tiny Llama-architecture model, built deterministically on disk.

The quickstart must run on a fresh clone with no network, so its "pretrained" model is made
locally on first use: random weights from a fixed seed, then (``pretrain_steps``) a short
pretraining on plain text, the kind a real base model has seen: word lists followed by their copy
or their reverse, words followed by their capitals, sums of two digits. The result is saved as an
ordinary HF folder (``config.json``, ``model.safetensors``) with the quickstart tokenizer shipped in
``torchft/data/assets`` as ``tokenizer.model``, and ``torchft_quickstart_base.json`` recording how
it was made (a later run with the same arguments reuses it). The fine-tune then teaches the
instruction format: "Write the word in capital letters." in the Llama 3 chat format.

    python -c "from torchft.training.quickstart import tiny_base_model; print(tiny_base_model('/tmp/tiny'))"
"""
import json
import random
import shutil
from pathlib import Path

import torch

MARKER = "torchft_quickstart_base.json"

# The words of the quickstart tasks (torchft/data/assets/generate_quickstart.py): the tokenizer has
# merges for them, so each is one or two tokens.
WORDS = (
    "apple river stone cloud green house music light table water bread chair paper smile dream grass "
    "plane train happy quiet brave storm ocean tiger lemon candy field night sugar glass north south "
    "piano robot pearl honey mouse horse sheep queen king snow rain wind fire earth star moon sun tree "
    "bird fish frog duck lion bear wolf fox owl bee ant cat dog cow pig hen"
).split()


def pretraining_text(rng: random.Random) -> str:
    """One plain-text pretraining document."""
    kind = rng.randrange(4)
    words = rng.sample(WORDS, rng.randint(2, 5))
    if kind == 0:
        return " ".join(words) + " . " + " ".join(words)
    if kind == 1:
        return " ".join(f"{w} {w.upper()}" for w in words)
    if kind == 2:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} + {b} = {a + b}"
    return " ".join(words) + " . " + " ".join(words[::-1])


def _pretrain(model, tokenizer, steps: int, seed: int, batch_size: int = 32, lr: float = 3e-3) -> float:
    """Full-parameter training on :func:`pretraining_text` documents; returns the last loss."""
    from torchft.data.collate import padded_collate
    from torchft.modules.loss import ChunkedCrossEntropy, output_params
    from torchft.training.lr_schedule import build_lr_scheduler
    from torchft.training.optim import build_adamw, clip_grad_norm
    from torchft.training.steps import forward_backward

    rng = random.Random(seed)
    optimizer = build_adamw(model.parameters(), lr=lr)
    scheduler = build_lr_scheduler(optimizer, "linear", num_warmup_steps=20, num_training_steps=steps)
    loss_fn = ChunkedCrossEntropy(num_chunks=1)
    loss = torch.zeros(())
    for _ in range(steps):
        docs = [tokenizer.encode(pretraining_text(rng), add_bos=True, add_eos=True) for _ in range(batch_size)]
        batch = padded_collate([{"tokens": d, "labels": d} for d in docs], pad_id=tokenizer.pad_id)
        loss, _ = forward_backward(model, [batch], loss_fn, output_params(model))
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return float(loss)


def tiny_base_model(
    path: str,
    seed: int = 0,
    pretrain_steps: int = 0,
    vocab_size: int = 1024,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 128,
    intermediate_dim: int = 384,
    max_seq_len: int = 512,
    tie_word_embeddings: bool = False,
    init_std: float = 0.02,
    output_init_std: float = 0.1,
) -> Path:
    """Write the tiny base model into ``path`` unless the same one is already there; return ``path``.

    Weights start as N(0, ``init_std``) (norms at 1; the output projection N(0, ``output_init_std``),
    see below), then ``pretrain_steps`` steps of pretraining run on one CPU thread (about 20 s for
    400 steps). The same arguments give the same model on the same machine, so rerunning or resuming
    the quickstart finds the base it started from.
    """
    from torchft.checkpoint import save_hf_checkpoint
    from torchft.data._assets import QUICKSTART_TOKENIZER, assets_path
    from torchft.data.tokenizers import llama3_tokenizer
    from torchft.models import LlamaArgs, build_from_args

    recipe = dict(seed=seed, pretrain_steps=pretrain_steps, vocab_size=vocab_size, num_layers=num_layers,
                  num_heads=num_heads, num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                  intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                  tie_word_embeddings=tie_word_embeddings, init_std=init_std, output_init_std=output_init_std)
    folder = Path(path)
    marker = folder / MARKER
    ours = marker.is_file() and json.loads(marker.read_text()) == recipe
    if ours and all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.model")):
        return folder  # already made by an earlier run
    if folder.exists() and any(folder.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{folder} exists and is not a quickstart base model: choose an empty folder")

    args = LlamaArgs(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                     rope_base=500000.0, tie_word_embeddings=tie_word_embeddings)
    tokenizer_file = assets_path(QUICKSTART_TOKENIZER)
    threads = torch.get_num_threads()
    # Private RNG and one thread: the same model every time, whatever the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            generator = torch.Generator().manual_seed(seed)
            model = build_from_args(args)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("layernorm.weight") or name == "norm.weight":
                        param.fill_(1.0)
                    elif name == "lm_head.weight":
                        # Logits are <final hidden, output row> and the final norm makes the hidden
                        # norm sqrt(dim): this std bounds the logits a LoRA fine-tune of the frozen
                        # output can reach (0.02 would cap them near 2.6 at dim 128).
                        param.normal_(0.0, output_init_std, generator=generator)
                    else:
                        param.normal_(0.0, init_std, generator=generator)
            if pretrain_steps:
                _pretrain(model, llama3_tokenizer(tokenizer_file), pretrain_steps, seed)
        finally:
            torch.set_num_threads(threads)
    save_hf_checkpoint(model.state_dict(), folder, config=args.to_hf_config(torch.float32), overwrite=True)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.model")
    marker.write_text(json.dumps(recipe, indent=2) + "\n")  # last: its presence means complete
    return folder


def quickstart_dataset(tokenizer, split: str = "train", source: str = "json", data_files=None, **kwargs):
    """The quickstart's data: the instruction tasks shipped in ``torchft/data/assets`` (``split``:
    ``train`` or ``validation``), or, when ``data_files`` is given, your own instruct file read whole
    (``source``: ``json`` for JSON/JSONL, ``parquet``, ...; columns instruction / input / output).

    Other ``kwargs`` go to :func:`torchft.data.datasets.instruct_dataset`.
    """
    from torchft.data._assets import quickstart_dataset as shipped
    from torchft.data.datasets import instruct_dataset

    if data_files is None:
        return shipped(tokenizer, split=split, **kwargs)
    return instruct_dataset(tokenizer, source=source, data_files=data_files, split="train", **kwargs)
