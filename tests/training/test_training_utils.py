"""Precision, RNG capture, signals, MFU arithmetic, activation checkpointing/offloading."""
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from torchft.training.activations import activation_offloading, apply_activation_checkpointing
from torchft.training.precision import resolve_device, resolve_dtype
from torchft.training.rng import get_rng_state, seed_everything, set_rng_state
from torchft.training.signals import StopRequested
from torchft.training.throughput import flops_per_token, llama_matmul_params, memory_stats, step_metrics


def test_resolve_dtype():
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(ValueError, match=r"dtype \(fp16\) must be one of bf16, fp32"):
        resolve_dtype("fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_resolve_device_without_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device \(cuda\) is not available"):
        resolve_device("cuda")


def test_rng_roundtrip(tmp_path):
    seed_everything(3)
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # how a resumed run reads it
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_sigterm_requests_a_stop():
    with StopRequested() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM" and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_mfu_formula_llama3_2_1b():
    # Llama-3.2-1B: 16 layers, dim 2048, 32 heads of 64, 8 kv heads, MLP 8192, vocab 128256
    n = llama_matmul_params(16, 2048, 32, 8, 64, 8192, 128256)
    assert n == 16 * (2048 * 64 * 80 + 3 * 2048 * 8192) + 2048 * 128256  # 1.236e9
    assert flops_per_token(n, 16, 2048, 2048, full_finetune=False) == 4 * n + 12 * 16 * 2048 * 2048
    metrics = step_metrics(1000, 0.5, 1.0, torch.device("cpu"))
    assert metrics["tokens_per_s"] == 2000 and "mfu" not in metrics  # no MFU without a known GPU
    assert memory_stats(torch.device("cpu"))["peak_rss_gib"] > 0


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, scale, *, mask=None):
        return x + self.b(torch.relu(self.a(x))) * scale


def test_activation_checkpointing_keeps_names_and_gradients():
    torch.manual_seed(0)
    model = nn.ModuleList([_Layer(), _Layer()])
    ref = nn.ModuleList([_Layer(), _Layer()])
    ref.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, _Layer) == 2
    assert list(model.state_dict()) == keys
    x = torch.randn(3, 8)
    for m in (model, ref):
        h = x
        for layer in m:
            h = layer(h, 0.5, mask=None)
        h.square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="found no Linear"):
        apply_activation_checkpointing(nn.Sequential(nn.ReLU()), nn.Linear)


def test_activation_offloading_needs_cuda():
    with activation_offloading(False, "cpu"):
        pass
    with pytest.raises(ValueError, match="enable_activation_offloading needs device=cuda"):
        activation_offloading(True, "cpu")


def test_quickstart_base_model_is_deterministic_and_guards_other_folders(tmp_path):
    from safetensors.torch import load_file

    from torchft.training.quickstart import tiny_base_model

    dims = dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, intermediate_dim=64)
    a = load_file(tiny_base_model(str(tmp_path / "a"), **dims) / "model.safetensors")
    b_dir = tiny_base_model(str(tmp_path / "b"), **dims)
    assert all(torch.equal(a[k], v) for k, v in load_file(b_dir / "model.safetensors").items())
    (b_dir / "tokenizer.model").unlink()  # an interrupted first run: written again
    assert (tiny_base_model(str(b_dir), **dims) / "tokenizer.model").is_file()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a quickstart base model"):
        tiny_base_model(str(tmp_path / "c"), **dims)


def test_device_auto_picks_the_cpu_without_cuda_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="torchft"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "device: auto -> cpu (no CUDA device found)" in caplog.text
    with pytest.raises(ValueError, match=r"device \(cuda\) is not available: no CUDA device found; use device=cpu"):
        resolve_device("cuda")  # an explicit cuda stays strict


@pytest.mark.parametrize("config", ["generation", "eleuther_evaluation", "quantization"])
def test_inference_configs_run_on_any_machine_by_default(config):
    from pathlib import Path

    from torchft.config import load_config

    assert load_config(Path(__file__).parents[2] / "recipes" / "configs" / f"{config}.yaml").device == "auto"


def test_resume_at_or_past_the_last_step_refuses():
    from torchft.training.steps import check_resume_step

    check_resume_step(4, 5)  # steps left: fine
    with pytest.raises(ValueError, match=r"step 5 is already the last one .*raise max_steps \(e\.g\. max_steps=10\)"):
        check_resume_step(5, 5)
    with pytest.raises(ValueError, match=r"past this run's last step \(3, from max_steps / epochs\): raise max_steps above 5"):
        check_resume_step(5, 3)
