"""Activation offloading: only the checkpointed layer inputs move, gradients are unchanged, and the
host RAM is checked before it is used."""
import contextlib
import weakref

import pytest
import torch

from torchft.training.activations import apply_activation_checkpointing


def _tiny_lora_model(checkpointing: bool):
    from torchft.models import llama
    from torchft.modules.peft import get_adapter_params, set_trainable_params

    torch.manual_seed(0)
    model = llama(vocab_size=100, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                  max_seq_len=64, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4)
    set_trainable_params(model, get_adapter_params(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_()  # non-zero adapters: every adapter gradient is non-trivial
    if checkpointing:
        apply_activation_checkpointing(model)
    return model


def test_offloading_moves_only_checkpointed_layer_inputs_and_changes_nothing():
    from torchft.training.activations import OffloadActivations

    tokens = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for offload in (False, True):
        model = _tiny_lora_model(checkpointing=True)
        offloader = OffloadActivations("cpu", min_bytes=1024)
        with offloader if offload else contextlib.nullcontext():
            hidden = model.hidden_states(tokens)
        hidden.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if offload:
            # three layer inputs and the final norm's input, [2, 32, 64] fp32 each, and once the RoPE
            # tables every layer takes as input, [2, 32, 16] each
            assert offloader.offloaded_bytes == (4 * 2 * 32 * 64 + 2 * 2 * 32 * 16) * 4
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_offloading_checks_host_memory(monkeypatch):
    from torchft.training import activations

    assert activations.offload_host_bytes(32, 1, 131072, 4096) == 33 * 131072 * 4096 * 2
    monkeypatch.setattr(activations, "available_host_bytes", lambda: 2**30)
    with pytest.raises(MemoryError, match=r"activation offloading needs 2\.0 GiB of host RAM but 1\.0 GiB"):
        activations.check_host_memory(2 * 2**30)
    model = _tiny_lora_model(checkpointing=True)
    monkeypatch.setattr(activations, "available_host_bytes", lambda: 10_000)
    with pytest.raises(MemoryError, match="host RAM"):
        with activations.OffloadActivations("cpu", min_bytes=1024):
            model.hidden_states(torch.randint(0, 100, (2, 32)))


class _CachingPinnedHost:
    """Host RAM as CUDA's caching host allocator leaves it: a freed pinned buffer is not returned
    (it stays locked, out of MemAvailable) but cached, and later buffers reuse it first."""

    def __init__(self, ram_bytes: int):
        self.free_ram, self.cached = ram_bytes, 0

    def new_buffer(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        reused = min(self.cached, nbytes)
        self.cached -= reused
        self.free_ram -= nbytes - reused
        assert self.free_ram >= 0, "offloading allocated more than the host has"
        buffer = torch.empty(numel, dtype=dtype)
        weakref.finalize(buffer, self._free, nbytes)
        return buffer

    def _free(self, nbytes: int) -> None:
        self.cached += nbytes


def test_offloading_reuses_cached_pinned_buffers_from_the_second_step(monkeypatch):
    """One forward's copies take 2/3 of the host RAM: every step fits, since the second step's
    copies go into the buffers the first one freed (cached by the allocator, not in MemAvailable)."""
    from torchft.training import activations

    tokens = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    model = _tiny_lora_model(checkpointing=True)
    offloader = activations.OffloadActivations("cpu", min_bytes=1024)
    with offloader:
        model.hidden_states(tokens).sum().backward()
    per_step = offloader.offloaded_bytes
    assert per_step > 0

    host = _CachingPinnedHost(ram_bytes=per_step * 3 // 2)
    monkeypatch.setattr(activations, "new_host_buffer", host.new_buffer)
    monkeypatch.setattr(activations, "available_host_bytes", lambda: host.free_ram)
    monkeypatch.setattr(activations, "cached_pinned_host_bytes", lambda: host.cached)
    for _ in range(3):
        with offloader:
            hidden = model.hidden_states(tokens)
        hidden.sum().backward()
        assert offloader.offloaded_bytes == per_step
    assert host.free_ram == per_step // 2  # what the first step took, reused since


@pytest.mark.parametrize("stats", [{"allocated_bytes.current": 5 << 20, "active_bytes.current": 2 << 20},
                                   {"reserved_bytes.current": 5 << 20, "allocated_bytes.current": 2 << 20}])
def test_cached_pinned_bytes_from_either_naming_of_the_host_allocator_stats(monkeypatch, stats):
    from torchft.training.activations import cached_pinned_host_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: stats)
    assert cached_pinned_host_bytes() == 3 << 20


def test_tiled_mlp_setting_keeps_the_step_equal_and_the_mlp_memory_per_tile():
    from torchft.training.activations import apply_tiled_mlp

    tokens = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(2))
    results = []
    for tile in (None, 16):
        model = _tiny_lora_model(checkpointing=False).double()
        if tile:
            assert apply_tiled_mlp(model, tile) == 3
        largest = []

        def pack(t):
            largest.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model.hidden_states(tokens)
        hidden.square().sum().backward()
        results.append((hidden, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, max(largest)))
    (plain, plain_grads, plain_largest), (tiled, tiled_grads, tiled_largest) = results
    torch.testing.assert_close(tiled, plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, msg=name)
    assert plain_largest == 64 * 128 and tiled_largest == 64 * 64  # [s, intermediate] no longer kept
    with pytest.raises(ValueError, match=r"tile_tokens \(0\) must be >= 1"):
        apply_tiled_mlp(model, 0)


@pytest.mark.parametrize("where", ["one_device", "sharded"])
def test_the_loss_runs_outside_the_offload_context(monkeypatch, where):
    """Offloading holds only the model's saved tensors: the loss's chunks are never copied to the host,
    on one device and in the data-parallel step (run here without a process group: nothing to reduce)."""
    from torchft.modules.loss import ChunkedCrossEntropy, output_params
    from torchft.training import distributed_steps, steps

    inside = []

    @contextlib.contextmanager
    def recording_offload(enabled, device):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    class RecordingLoss(ChunkedCrossEntropy):
        calls_inside = []

        def __call__(self, *args, **kwargs):
            self.calls_inside.append(bool(inside))
            return super().__call__(*args, **kwargs)

    model = _tiny_lora_model(checkpointing=True)
    batch = {"tokens": torch.randint(0, 100, (1, 16)), "labels": torch.randint(0, 100, (1, 16))}
    loss_fn = RecordingLoss(chunk_tokens=8)
    monkeypatch.setattr(steps, "activation_offloading", recording_offload)  # both steps share one micro-batch body
    if where == "one_device":
        steps.forward_backward(model, [batch], loss_fn, output_params(model), offload_activations=True)
    else:
        distributed_steps.sharded_forward_backward(model, [batch], loss_fn, offload_activations=True)
    assert loss_fn.calls_inside == [False]


def test_offloading_leaves_weights_and_their_views_alone():
    from torchft.training.activations import OffloadActivations

    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    offloader = OffloadActivations("cpu", min_bytes=1024)
    with offloader:
        y = torch.mm(x.tanh(), weight.t())  # mm saves the weight's transposed view and tanh's output
    y.sum().backward()
    assert offloader.offloaded_bytes == 8 * 64 * 4  # tanh's output only


@pytest.mark.gpu
def test_cuda_offloading_equals_no_offloading(monkeypatch):
    """The real thing: pinned host copies on a side stream, prefetched in backward."""
    from torchft.training import activations
    from torchft.training.activations import activation_offloading

    monkeypatch.setattr(activations, "OFFLOAD_MIN_BYTES", 1024)  # the tiny layer inputs: 32 KiB each

    tokens = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    grads = []
    for offload in (False, True):
        model = _tiny_lora_model(checkpointing=True).cuda()
        context = activation_offloading(offload, "cuda")
        with context:
            hidden = model.hidden_states(tokens)
        hidden.square().sum().backward()
        torch.cuda.synchronize()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if offload:
            assert context.offloaded_bytes > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
