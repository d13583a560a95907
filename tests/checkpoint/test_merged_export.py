"""A LoRA/DoRA/QLoRA model's merged export: adapters merged onto the original weights, one shard at a time."""

import pytest
import torch
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile

from torchft.checkpoint import HFCheckpointer, load_hf_checkpoint, save_hf_checkpoint
from torchft.models import from_hf_config
from torchft.training.checkpointing import cpu_state_dict
from torchft.training.setup import load_adapter_model


def _config(dim=128, hidden=256, layers=2, vocab=128):
    # Every linear has a multiple of 16384 elements, so QLoRA stores all of them as NF4.
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}


def _base_folder(path, dtype=torch.bfloat16, **dims):
    torch.manual_seed(0)
    config = _config(**dims)
    model = from_hf_config(config)
    save_hf_checkpoint({k: v.to(dtype) for k, v in model.state_dict().items()}, path, config=config)
    return path


def _trained_adapter_model(ckpt, *, quantize_base=True, use_dora=False):
    """A (Q)LoRA model loaded as the recipe loads it, with random (non-zero) adapters as after training."""
    with torch.device("meta"):
        model = from_hf_config(ckpt.checkpoint_dir, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False,
                               lora_rank=4, lora_alpha=8, use_dora=use_dora, quantize_base=quantize_base)
    load_adapter_model(model, ckpt.load_model_state_dict(), torch.device("cpu"), torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # lora_a, lora_b, magnitude
                param.add_(0.05 * torch.randn(param.shape, generator=gen).to(param.dtype))
    return model


def _expected_merge(original, module):
    """original + (alpha / r) B A, by the definition (DoRA: row-normalized, times the magnitude)."""
    adapted = original.float() + module.scaling * (module.lora_b.weight.float() @ module.lora_a.weight.float())
    if hasattr(module, "magnitude"):
        adapted = module.magnitude.float()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    return adapted.to(original.dtype)


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_export_is_the_original_weights_plus_the_adapter_delta(tmp_path, use_dora):
    base = _base_folder(tmp_path / "base")
    ckpt = HFCheckpointer(base, tmp_path / "out")
    model = _trained_adapter_model(ckpt, use_dora=use_dora)
    assert type(model.layers[0].mlp.up_proj.weight).__name__ == "NF4Tensor"

    step = ckpt.save(1, model, adapter_model=model)
    saved = load_file(step / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert saved.keys() == original.keys()
    adapted = {f"model.layers.{i}.self_attn.{p}.weight": model.layers[i].self_attn.get_submodule(p)
               for i in range(2) for p in ("q_proj", "v_proj")}
    for key, tensor in original.items():
        want = _expected_merge(tensor, adapted[key]) if key in adapted else tensor
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], want), key
    assert (step / "adapter" / "adapter_model.safetensors").is_file()


def test_merge_onto_model_keeps_the_dequantized_nf4_variant(tmp_path):
    base = _base_folder(tmp_path / "base")
    ckpt = HFCheckpointer(base, tmp_path / "out", merge_onto="model")
    model = _trained_adapter_model(ckpt)
    saved = load_file(ckpt.save(1, model) / "model.safetensors")
    original = load_file(base / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"  # no adapter: the NF4 approximation of the original
    assert torch.equal(saved[key], model.layers[0].mlp.up_proj.weight.get_original_weight())
    assert not torch.equal(saved[key], original[key])
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], model.layers[0].self_attn.q_proj.merged_weight())


def test_merge_onto_is_checked():
    with pytest.raises(ValueError, match=r"merge_onto \('nf4'\) must be 'checkpoint'.*or 'model'"):
        HFCheckpointer(".", "/tmp/unused", merge_onto="nf4")


def test_sharded_export_equals_the_one_file_export(tmp_path):
    base = _base_folder(tmp_path / "base")
    ckpt = HFCheckpointer(base, tmp_path / "one")
    model = _trained_adapter_model(ckpt, quantize_base=False)
    whole = load_hf_checkpoint(ckpt.save(1, model), validate=False)
    sharded_ckpt = HFCheckpointer(base, tmp_path / "many", max_shard_size="100KiB")
    step = sharded_ckpt.save(1, model)
    assert len(list(step.glob("model-*-of-*.safetensors"))) > 3 and not list(step.glob("*.partial"))
    sharded = load_hf_checkpoint(step)  # the index and every shard, checked against config.json
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes of CPU tensors allocated and not yet freed while ``fn()`` runs (torch's profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An op's own allocations are counted at its start; frees are "[memory]" events with negative sizes.
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def test_export_holds_one_shard_not_a_second_copy_of_the_model(tmp_path, monkeypatch):
    # 3 layers of 0.66M weights, fp32 on disk (8 MB), bf16 in the model (a LoRA model: NF4 only slows this down).
    base = _base_folder(tmp_path / "base", dtype=torch.float32, dim=256, hidden=512, layers=3, vocab=256)
    ckpt = HFCheckpointer(base, tmp_path / "out", max_shard_size="512KiB")
    model = _trained_adapter_model(ckpt, quantize_base=False)
    model_bytes = sum(t.numel() * t.element_size() for t in load_hf_checkpoint(base).values())
    largest = 512 * 256 * 4  # one MLP weight in fp32

    # The originals are memory-mapped (the profiler would count the mapping as one allocation of the
    # whole file); map them before measuring, so what is measured is what the export allocates.
    originals = ckpt.load_model_state_dict()
    monkeypatch.setattr(ckpt, "load_model_state_dict", lambda *args: originals)
    peak = _peak_cpu_bytes(lambda: ckpt.save(1, model))
    # The shard being filled plus the temporaries of one merge; frozen weights are not copied.
    assert 0 < peak <= 2**19 + 4 * largest < model_bytes / 2, (peak, model_bytes)

    # The measure sees a whole-model copy: the merged state dict built at once (bf16) holds all of it.
    whole_bytes = model_bytes // 2
    assert _peak_cpu_bytes(lambda: cpu_state_dict(model, merge_adapters=True)) >= whole_bytes


def test_meta_checkpointer_merges_onto_its_consolidated_weights(tmp_path):
    from tests.checkpoint._tiny import save_meta_folder, tiny_hf_model
    from torchft.checkpoint import MetaCheckpointer
    from torchft.checkpoint.meta import meta_to_torchft_key

    written = save_meta_folder(tiny_hf_model("llama3"), tmp_path / "in")
    ckpt = MetaCheckpointer(tmp_path / "in", tmp_path / "out")
    with torch.device("meta"):
        model = from_hf_config(ckpt.model_args.to_hf_config(), lora_attn_modules=["v_proj"], lora_rank=4, lora_alpha=8)
    load_adapter_model(model, ckpt.load_model_state_dict(), torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():
        model.layers[1].self_attn.v_proj.lora_b.weight.normal_()
    saved = torch.load(ckpt.save(1, model) / "consolidated.00.pth", weights_only=True)
    assert saved.keys() == written.keys()
    v_proj = model.layers[1].self_attn.v_proj
    for key, tensor in written.items():  # fp32 originals, the model is bf16
        want = _expected_merge(tensor, v_proj) if key == "layers.1.attention.wv.weight" else tensor
        assert torch.equal(saved[key], want), (key, meta_to_torchft_key(key))
