"""Long context: the tiled MLP key (same training, less activation memory), the host-RAM check of
activation offloading before the first step, and what `tune estimate` makes of both."""
import pytest
import torch
from safetensors.torch import load_file

from tests.recipes._finetune import make_base, restore_torch_threads, tiny_config, train_losses

_threads = pytest.fixture(autouse=True)(restore_torch_threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("long_context_base"))


def test_tiled_mlp_key_trains_as_the_whole_mlp(tmp_path, base):
    from torchft._recipes import lora_finetune_single_device as recipe
    from torchft.modules.feed_forward import FeedForward

    runs = {}
    for name, tile in (("whole", "null"), ("tiled", "16")):  # quickstart rows are 30-128 tokens: 2-8 tiles
        cfg = tiny_config("lora", tmp_path / name, base, ["max_steps=3", f"tiled_mlp_tokens={tile}",
                                                          "validation_dataset=null", "eval_every_n_steps=null",
                                                          "save_every_n_steps=3"])
        recipe.main(cfg)
        runs[name] = tmp_path / name / "out"
    whole, tiled = train_losses(runs["whole"]), train_losses(runs["tiled"])
    assert list(tiled) == [1, 2, 3]
    for step in whole:  # the same sums in another order: equal to float32 rounding
        assert abs(tiled[step] - whole[step]) < 1e-5, (step, tiled[step], whole[step])
    adapters = [load_file(out / "step_3" / "adapter" / "adapter_model.safetensors") for out in runs.values()]
    for key, value in adapters[0].items():  # gradients equal: so are three AdamW updates of them
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-5, msg=key)

    # and the key reached the model: the wiring set every MLP's tile
    from torchft.training.wiring import apply_activation_settings

    model = torch.nn.Sequential(FeedForward(torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)))
    apply_activation_settings(model, 16, activation_checkpointing=False, compile=False)
    assert model[0].tile_tokens == 16


def test_offloading_is_refused_before_the_first_step_when_host_ram_cannot_hold_it(monkeypatch):
    """8 ranks of an 8B model at 65,536 tokens offload 33 layer inputs of [1, 65536, 4096] bf16 each:
    16.5 GiB a rank, 132 GiB for the machine; with 100 GiB available the run stops in one line."""
    from torchft.config import ConfigError
    from torchft.models.llama3_1 import lora_llama3_1_8b
    from torchft.training import activations
    from torchft.training.wiring import Run, check_offload_memory

    with torch.device("meta"):
        model = lora_llama3_1_8b(lora_attn_modules=["q_proj"])
    run = Run(output_dir=None, device=torch.device("cuda"), dtype=torch.bfloat16, env=object())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(activations, "available_host_bytes", lambda: 100 * 2**30)
    with pytest.raises(MemoryError, match=r"^activation offloading \(33 layer inputs of 1 x 65536 tokens x 4096 x 2 "
                                          r"bytes, on 8 rank\(s\) of this machine\) needs 132\.0 GiB of host RAM but "
                                          r"100\.0 GiB are available: lower batch_size"):
        check_offload_memory(model, run, 1, 65536, enabled=True)
    monkeypatch.setattr(activations, "available_host_bytes", lambda: 140 * 2**30)
    check_offload_memory(model, run, 1, 65536, enabled=True)  # fits: nothing said
    check_offload_memory(model, run, 64, 65536, enabled=False)  # not offloading: no check
    # off CUDA, offloading is refused at setup (before any step or write), in one line
    with pytest.raises(ConfigError, match="^enable_activation_offloading needs device=cuda"):
        check_offload_memory(model, Run(None, torch.device("cpu"), torch.float32), 1, 128, enabled=True)


def test_offloading_on_a_cpu_run_is_refused_before_anything_is_written(tmp_path, base):
    from torchft._recipes import lora_finetune_single_device as recipe
    from torchft.config import ConfigError

    cfg = tiny_config("lora", tmp_path, base, ["enable_activation_checkpointing=true",
                                               "enable_activation_offloading=true"])
    with pytest.raises(ConfigError, match="^enable_activation_offloading needs device=cuda"):
        recipe.main(cfg)
    assert not (tmp_path / "out").exists()


def test_estimate_drops_with_the_tiled_mlp_and_counts_the_offloaded_host_ram():
    from torchft.models import from_hf_config
    from torchft.modules.loss import ChunkedCrossEntropy
    from torchft.modules.peft import get_adapter_params, set_trainable_params
    from torchft.training.activations import offload_host_bytes
    from torchft.training.estimate import estimate_step

    # a small model at a length where the MLP's [s, intermediate] tensors lead the peak
    hf = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=1024,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    estimates = {}
    for tile in (None, 512):
        with torch.device("meta"):
            model = from_hf_config(hf, lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8)
        set_trainable_params(model, get_adapter_params(model))
        estimates[tile] = estimate_step(model, batch_size=1, seq_len=8192, loss_fn=ChunkedCrossEntropy(1024),
                                        make_optimizer=torch.optim.AdamW, activation_checkpointing=True,
                                        offload_activations=True, tiled_mlp_tokens=tile)
    whole, tiled = estimates[None], estimates[512]
    assert tiled.settings["tiled_mlp_tokens"] == 512
    # untiled, a recomputed layer's backward holds several [8192, 1024] fp32 MLP intermediates (32 MiB each)
    assert tiled.peak_bytes < whole.peak_bytes - 64 * 2**20, (tiled.peak_gib, whole.peak_gib)
    # the offloaded layer inputs are in host memory, the same with or without tiles
    assert tiled.host_bytes == whole.host_bytes >= offload_host_bytes(2, 1, 8192, 64, torch.float32)


def test_docs_quote_the_distributed_long_context_estimate():
    """docs/distributed.md's figures for llama3_1/8B_lora_long_context (the config's row) are a fresh estimate,
    and `tune estimate` names the tiles."""
    import re
    from pathlib import Path

    from torchft.training.estimate import GIB, estimate_memory

    page = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    row = re.search(r"^\| `tiled_mlp_tokens: 8192` \(the config\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", page, re.M)
    estimate = estimate_memory("llama3_1/8B_lora_long_context", nproc_per_node=8)
    for quoted, actual in zip(row.groups(), (estimate.peak_bytes, estimate.needed_bytes, estimate.host_bytes)):
        assert abs(actual / GIB - float(quoted)) <= 0.051, (quoted, actual / GIB)
    from torchft.cli import estimate as cli_estimate

    assert cli_estimate._tiles(estimate.settings) == ", MLP in tiles of 8192 tokens"
