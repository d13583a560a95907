"""Bad input: one clear error naming the file and the problem, raised before anything is assigned."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.checkpoint._tiny import save_meta_folder, tiny_hf_model
from torchft.checkpoint import (
    CheckpointError, HFCheckpointer, MetaCheckpointer, check_state_dict, load_hf_checkpoint,
    load_meta_checkpoint, load_native_checkpoint, load_state_dict_strict, save_hf_checkpoint,
)
from torchft.models import LlamaArgs, build_from_args


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("llama3")


@pytest.fixture
def sharded_dir(hf_model, tmp_path):
    """An HF folder with the weights in several shards (model-0000i-of-0000N.safetensors) + index."""
    folder = tmp_path / "ckpt"
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    save_hf_checkpoint(sd, folder, config=hf_model.config.to_dict(), max_shard_size="80KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


def _rewrite_shard_without(folder, hf_key):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][hf_key]
    from safetensors.torch import load_file

    tensors = {k: v.clone() for k, v in load_file(shard).items() if k != hf_key}
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard, index


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope'}: checkpoint folder does not exist")):
        load_hf_checkpoint(tmp_path / "nope")
    # a config's folder (what `tune run` meets when the model was not downloaded): what to do, too
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{tmp_path / 'nope'}: checkpoint folder does not exist (download the model there, e.g. "
            f"`tune download REPO_ID --output-dir {tmp_path / 'nope'}`, or set checkpointer.checkpoint_dir=PATH)")):
        HFCheckpointer(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no model weights found"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'config.json'}: config.json not found")):
        HFCheckpointer(tmp_path, tmp_path.parent / "out")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'params.json'}: params.json not found")):
        MetaCheckpointer(tmp_path, tmp_path.parent / "out")


def test_missing_key_names_the_shard_and_key(sharded_dir):
    # The key is gone from both its shard and the index: blame the shard of the key before it.
    _, index = _rewrite_shard_without(sharded_dir, "model.layers.1.mlp.up_proj.weight")
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = sharded_dir / index["weight_map"]["model.layers.1.mlp.gate_proj.weight"]
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: missing key model.layers.1.mlp.up_proj.weight")):
        load_hf_checkpoint(sharded_dir)


def test_key_listed_in_index_but_absent_from_shard(sharded_dir):
    shard, _ = _rewrite_shard_without(sharded_dir, "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{shard}: missing key model.layers.0.self_attn.k_proj.weight (listed in model.safetensors.index.json)")):
        load_hf_checkpoint(sharded_dir)


def test_unexpected_key(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    sd = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)  # a third layer the config lacks
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'model.safetensors'}: unexpected key model.layers.2.mlp.up_proj.weight")):
        load_hf_checkpoint(tmp_path)


def test_shape_disagrees_with_config(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'model.safetensors'}: model.layers.0.mlp.gate_proj.weight has shape [128, 64] "
            "but the model config expects [96, 64]")):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(sharded_dir, damage):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x37" * 100)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: not a valid safetensors file, truncated or corrupt (")
                       + r".*\); replace it with a complete copy \(download or copy it again\)$"):
        load_hf_checkpoint(sharded_dir)


def test_index_names_missing_shard(sharded_dir):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{shard}: shard named in model.safetensors.index.json does not exist")):
        load_hf_checkpoint(sharded_dir)


def test_unreadable_index(sharded_dir):
    (sharded_dir / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{sharded_dir / 'model.safetensors.index.json'}: unreadable index")):
        load_hf_checkpoint(sharded_dir)


def test_output_inside_input_is_refused(sharded_dir):
    sd = load_hf_checkpoint(sharded_dir)
    with pytest.raises(CheckpointError, match="must not be inside the input checkpoint folder"):
        save_hf_checkpoint(sd, sharded_dir / "finetuned", copy_files_from=sharded_dir)
    with pytest.raises(CheckpointError, match=re.escape(f"{sharded_dir / 'out'}: output folder must not be inside")):
        HFCheckpointer(sharded_dir, sharded_dir / "out")
    with pytest.raises(CheckpointError, match="must not be inside"):
        HFCheckpointer(sharded_dir, sharded_dir)


def test_existing_output_is_not_overwritten_by_default(sharded_dir, tmp_path):
    sd = load_hf_checkpoint(sharded_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="output folder exists and is not empty"):
        save_hf_checkpoint(sd, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_config_of_another_architecture_is_surfaced(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + ".*mistral"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="mistral"):
        HFCheckpointer(tmp_path, tmp_path.parent / "out").model_args


def test_unreadable_params_json_and_sharded_consolidated(hf_model, tmp_path):
    save_meta_folder(hf_model, tmp_path)
    (tmp_path / "params.json").write_text('{"dim": 64,')
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'params.json'}: unreadable params.json")):
        load_meta_checkpoint(tmp_path)
    (tmp_path / "params.json").write_text('{"dim": 64}')
    with pytest.raises(CheckpointError, match="params.json needs an integer 'n_layers'"):
        load_meta_checkpoint(tmp_path)
    save_meta_folder(hf_model, tmp_path)
    (tmp_path / "consolidated.01.pth").write_bytes((tmp_path / "consolidated.00.pth").read_bytes())
    with pytest.raises(CheckpointError, match="2 consolidated.*pth files \\(model-parallel shards\\) are not supported"):
        load_meta_checkpoint(tmp_path)


def test_meta_missing_key_and_corrupt_file(hf_model, tmp_path):
    written = save_meta_folder(hf_model, tmp_path)
    del written["layers.1.feed_forward.w3.weight"]
    torch.save(written, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'consolidated.00.pth'}: missing key layers.1.feed_forward.w3.weight")):
        load_meta_checkpoint(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(CheckpointError, match="consolidated.00.pth: unreadable PyTorch file"):
        load_meta_checkpoint(tmp_path)


def test_native_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file does not exist"):
        load_native_checkpoint(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="plain.safetensors: not a torchft checkpoint"):
        load_native_checkpoint(tmp_path / "plain.safetensors")


def test_check_state_dict_against_args_and_nothing_half_loaded(hf_model):
    args = LlamaArgs.from_hf_config(hf_model.config.to_dict())
    model = build_from_args(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    check_state_dict(good, args)  # fits

    bad = dict(good)
    bad["layers.1.self_attn.v_proj.weight"] = torch.zeros(64, 64)  # GQA: should be [2 * 16, 64]
    with pytest.raises(CheckpointError, match=re.escape(
            "ckpt_dir: layers.1.self_attn.v_proj.weight has shape [64, 64] but the model config expects [32, 64]")):
        check_state_dict(bad, args, where="ckpt_dir")
    with pytest.raises(CheckpointError, match="v_proj.weight has shape"):
        load_state_dict_strict(model, bad)
    # Every earlier key was fine, yet nothing was assigned.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    missing = {k: v for k, v in good.items() if k != "norm.weight"}
    with pytest.raises(CheckpointError, match="state dict: missing key norm.weight"):
        load_state_dict_strict(model, missing)
    load_state_dict_strict(model, good)
    assert torch.equal(model.state_dict()["norm.weight"], good["norm.weight"])


def test_missing_consolidated_file_and_corrupt_bin(hf_model, tmp_path):
    save_meta_folder(hf_model, tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth: no consolidated.\\*.pth file found"):
        load_meta_checkpoint(tmp_path / "meta")
    hf_model.config.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not a zip archive at all")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'bin' / 'pytorch_model.bin'}: unreadable PyTorch file")):
        load_hf_checkpoint(tmp_path / "bin")
