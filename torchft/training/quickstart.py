"""The quickstart's base model: a tiny Llama-architecture model written deterministically to disk.

The quickstart must run on a fresh clone with no network, so its "pretrained" model is created
locally: random weights from a fixed seed (the usual 0.02-std normal init), saved as an ordinary HF
folder (``config.json``, ``model.safetensors``) with the quickstart tokenizer shipped in
``torchft/data/assets`` copied in as ``tokenizer.model``. The quickstart configs call
:func:`tiny_base_model` before loading the checkpoint; anything that reads HF folders (transformers
included) can load it too.

    python -c "from torchft.training.quickstart import tiny_base_model; print(tiny_base_model('/tmp/tiny'))"
"""
import json
import shutil
from pathlib import Path

import torch


def tiny_base_model(
    path: str,
    seed: int = 0,
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

    The same arguments always give the same weights (bit for bit), so rerunning the quickstart, or
    resuming it, finds the base it started from.
    """
    from torchft.checkpoint import save_hf_checkpoint
    from torchft.models import LlamaArgs, build_from_args

    args = LlamaArgs(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                     rope_base=500000.0, tie_word_embeddings=tie_word_embeddings)
    config = args.to_hf_config(torch.float32)
    folder = Path(path)
    config_file = folder / "config.json"
    ours = config_file.is_file() and json.loads(config_file.read_text()) == config
    if ours and all((folder / name).is_file() for name in ("model.safetensors", "tokenizer.model")):
        return folder  # already created by an earlier run
    if not ours and folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not the quickstart base model: choose an empty folder")

    generator = torch.Generator().manual_seed(seed)
    model = build_from_args(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name == "lm_head.weight":
                # Logits are <final hidden, output row> and the final norm makes the hidden norm
                # sqrt(dim): this std sets the largest logit a fine-tune of the frozen base can
                # reach (0.02 would cap it near 2.6 at dim 128: the loss could not go much lower).
                param.normal_(0.0, output_init_std, generator=generator)
            else:
                param.normal_(0.0, init_std, generator=generator)
    save_hf_checkpoint(model.state_dict(), folder, config=config, overwrite=True)
    from torchft.data._assets import QUICKSTART_TOKENIZER, assets_path

    shutil.copyfile(assets_path(QUICKSTART_TOKENIZER), folder / "tokenizer.model")
    return folder
