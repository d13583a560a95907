"""Meta format: consolidated.00.pth + params.json load with matching logits (q/k permuted from the
interleaved RoPE layout) and save back bit-exact."""
import json
import math

import pytest
import torch

from tests.checkpoint._tiny import (
    META_VARIANTS, VARIANTS, assert_logits_close, hf_rows_to_meta_rows, logits, save_meta_folder, tiny_hf_model, tokens,
)
from torchft.checkpoint import MetaCheckpointer, load_meta_args, load_meta_checkpoint, save_meta_checkpoint
from torchft.checkpoint.meta import hf_config_to_meta_params, interleaved_to_rotate_half, meta_ffn_dim
from torchft.models import LlamaArgs, build_from_args


@pytest.mark.parametrize("variant", sorted(META_VARIANTS))
def test_meta_to_torchft_to_meta(variant, tmp_path):
    hf = tiny_hf_model(variant)
    written = save_meta_folder(hf, tmp_path / "in")
    x = tokens()

    ckpt = MetaCheckpointer(tmp_path / "in", tmp_path / "out")
    args = ckpt.model_args
    assert args.tie_word_embeddings == VARIANTS[variant]["tie_word_embeddings"]
    assert args.rope_scaling == VARIANTS[variant].get("rope_scaling")
    assert (args.num_kv_heads, args.head_dim, args.intermediate_dim) == (
        hf.config.num_key_value_heads, hf.config.head_dim, hf.config.intermediate_size)
    with torch.device("meta"):
        model = build_from_args(args)
    model.load_state_dict(ckpt.load_model_state_dict(), assign=True)
    assert_logits_close(logits(model.eval(), x), logits(hf, x))

    step = ckpt.save(5, model.state_dict())
    saved = torch.load(step / "consolidated.00.pth", weights_only=True)
    assert saved.keys() == written.keys() - {"rope.freqs"}
    assert all(torch.equal(saved[k], written[k]) for k in saved)
    assert json.loads((step / "params.json").read_text()) == json.loads((tmp_path / "in" / "params.json").read_text())
    assert (step / "tokenizer.model").read_bytes() == (tmp_path / "in" / "tokenizer.model").read_bytes()
    reloaded = ckpt.load_model_state_dict(step)
    assert reloaded.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


def test_params_derived_from_args_round_trip(tmp_path):
    """save_meta_checkpoint without the original params.json derives one that reads back to the same args."""
    hf = tiny_hf_model("llama3_1")
    args = LlamaArgs.from_hf_config(hf.config.to_dict())
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    save_meta_checkpoint(sd, tmp_path / "meta", config=args)
    back = load_meta_args(tmp_path / "meta", max_seq_len=args.max_seq_len)
    assert back == args
    loaded = load_meta_checkpoint(tmp_path / "meta")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dim,intermediate", [(4096, 14336), (2048, 8192), (3072, 8192), (4096, 11008), (8192, 28672), (64, 100)])
def test_ffn_params_reproduce_intermediate_size(dim, intermediate):
    params = hf_config_to_meta_params({"hidden_size": dim, "num_attention_heads": 32, "num_hidden_layers": 2,
                                       "vocab_size": 10, "intermediate_size": intermediate})
    assert meta_ffn_dim(dim, params["multiple_of"], params["ffn_dim_multiplier"]) == intermediate


def test_llama2_layout_vocab_from_weights_and_rope_freqs_ignored(tmp_path):
    hf = tiny_hf_model("llama2")
    save_meta_folder(hf, tmp_path, llama2_style_vocab=True)  # "vocab_size": -1 and a rope.freqs buffer
    args = load_meta_args(tmp_path)
    assert args.vocab_size == hf.config.vocab_size and args.max_seq_len == 4096 and args.rope_scaling is None
    assert "rope.freqs" not in load_meta_checkpoint(tmp_path)


def test_permutation_turns_interleaved_rope_into_rotate_half():
    """Attention scores with Meta's complex-number RoPE on Meta rows equal rotate-half RoPE on our rows."""
    torch.manual_seed(0)
    n_heads, head_dim, dim, seq = 2, 8, 16, 5
    wq_meta = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(seq, dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), inv_freq)  # [seq, head_dim/2]

    # Meta: pairs (2j, 2j+1) are one complex number rotated by angle j.
    q = (x @ wq_meta.T).view(seq, n_heads, head_dim // 2, 2)
    q_meta = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(angles), angles)[:, None])
    scores_meta = torch.einsum("shd,thd->hst", q_meta.flatten(2), q_meta.flatten(2))

    # Ours: rows permuted, element j pairs with j + head_dim/2.
    q = (x @ interleaved_to_rotate_half(wq_meta, n_heads).T).view(seq, n_heads, head_dim)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    half = torch.cat([-q[..., head_dim // 2:], q[..., : head_dim // 2]], -1)
    q_ours = q * cos + half * sin
    scores_ours = torch.einsum("shd,thd->hst", q_ours, q_ours)
    torch.testing.assert_close(scores_ours, scores_meta, atol=1e-4 * math.sqrt(dim), rtol=1e-5)
    # And the row gather written by definition in the test helper is the inverse.
    assert torch.equal(hf_rows_to_meta_rows(interleaved_to_rotate_half(wq_meta, n_heads), n_heads), wq_meta)
