"""HF format: transformers folders load into torchft with matching logits, and torchft's saves load back
into transformers; round trips are bit-exact."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint._tiny import (
    VARIANTS, assert_logits_close, logits, save_hf_folder, tiny_hf_model, tokens,
)
from torchft.checkpoint import load_hf_args, load_hf_checkpoint, save_hf_checkpoint
from torchft.models import build_from_args


def _load_into_torchft(folder):
    """Build on meta, assign the memory-mapped tensors: the path recipes take."""
    args = load_hf_args(folder)
    with torch.device("meta"):
        model = build_from_args(args)
    model.load_state_dict(load_hf_checkpoint(folder), assign=True)
    return model.eval()


def _read_hf_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_to_torchft_to_hf(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "in", tmp_path / "out"
    hf = save_hf_folder(variant, src)
    x = tokens()
    expected = logits(hf, x)

    # transformers folder -> torchft: same logits.
    model = _load_into_torchft(src)
    assert_logits_close(logits(model, x), expected)
    # No copy: the parameters are the memory-mapped tensors.
    assert all(not p.is_meta for p in model.parameters())

    # torchft -> HF: bit-exact, identical key set, support files copied, transformers loads it.
    save_hf_checkpoint(model.state_dict(), out, config=model.args, copy_files_from=src)
    before, after = _read_hf_tensors(src), _read_hf_tensors(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ("lm_head.weight" in after) == (not VARIANTS[variant]["tie_word_embeddings"])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "original/tokenizer.model"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_logits_close(logits(reloaded, x), expected)
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_sharded_save_round_trips_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_model("llama3")
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    config = hf.config.to_dict()
    save_hf_checkpoint(sd, tmp_path / "out", config=config, max_shard_size="40KB")

    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {("model." + k if k != "lm_head.weight" else k) for k in sd}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert all((tmp_path / "out" / s).stat().st_size < 40_000 + 4_096 for s in shards)  # + header
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(json.dumps(config))

    loaded = load_hf_checkpoint(tmp_path / "out")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    x = tokens()
    assert_logits_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), x), logits(hf, x))


def test_single_file_when_it_fits(tmp_path):
    hf = tiny_hf_model("llama3_2")
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    from torchft.models import LlamaArgs

    args = LlamaArgs.from_hf_config(hf.config.to_dict())
    save_hf_checkpoint(sd, tmp_path / "out", config=args)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")  # tied: not written
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_files_load(sharded, tmp_path):
    hf = tiny_hf_model("llama3")
    hf.config.save_pretrained(tmp_path)
    hf_sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if sharded:
        keys = list(hf_sd)
        halves = {"pytorch_model-00001-of-00002.bin": keys[:10], "pytorch_model-00002-of-00002.bin": keys[10:]}
        for name, ks in halves.items():
            torch.save({k: hf_sd[k] for k in ks}, tmp_path / name)
        weight_map = {k: name for name, ks in halves.items() for k in ks}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(hf_sd, tmp_path / "pytorch_model.bin")
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.keys() == {k.removeprefix("model.") for k in hf_sd}
    assert all(torch.equal(loaded[k.removeprefix("model.")], v) for k, v in hf_sd.items())


def test_stray_tied_lm_head_and_old_rotary_buffers_are_dropped(tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf_model("llama3_2")
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_hf_checkpoint(tmp_path)
    assert "lm_head.weight" not in loaded and not any("inv_freq" in k for k in loaded)
