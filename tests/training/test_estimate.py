"""tune estimate's engine: the meta-tensor step against the CPU allocator's peak in a real step, linear
growth in the sequence length, offloading, the FSDP arithmetic and the fit advice."""
import logging

import pytest
import torch
from omegaconf import OmegaConf

from torchft.models._llama import llama
from torchft.modules.loss import ChunkedCrossEntropy, output_params, shift_targets
from torchft.modules.peft import get_adapter_params, set_trainable_params
from torchft.modules.peft._nf4 import is_nf4
from torchft.training.activations import activation_offloading, apply_activation_checkpointing
from torchft.training.estimate import (CUBLAS_WORKSPACE_BYTES, GIB, _plan, estimate_memory, estimate_step,
                                       fsdp_per_rank, parse_memory_size, warn_if_over_memory, ways_to_fit,
                                       with_cublas_workspaces)
from torchft.training.estimate_tracking import MemoryTracker, offloaded_to_host
from torchft.training.optim import OptimizerInBackward, build_adamw, clip_grad_norm
from torchft.training.qat import QATSettings, apply_qat
from torchft.training.setup import default_dtype
from torchft.training.steps import forward_backward

TINY = dict(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128)
# One Llama-3.2-1B decoder layer (dim 2048, 32/8 heads, MLP 8192) with a small vocabulary.
ONE_B_LAYER = dict(vocab_size=2048, num_layers=1, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192)
# Every linear a multiple of 16384 elements, so the base weights really are NF4.
SMALL_NF4 = dict(vocab_size=512, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512)


@pytest.fixture(autouse=True)
def one_thread():
    # the real-tensor steps are small: one intra-op thread is fastest on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(device, dims, *, adapters=True, qlora=False, dtype=torch.bfloat16, qat=None):
    torch.manual_seed(0)
    lora = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=8) if adapters else {}
    with torch.device(device), default_dtype(dtype):
        model = llama(**dims, max_seq_len=4096, quantize_base=qlora, **lora)
    if adapters:
        set_trainable_params(model, get_adapter_params(model))
    if qat is not None:  # fake-quantized linears, as the recipes prepare them
        apply_qat(model, QATSettings(qat, group_size=32))
    return model


def make_optimizer(in_backward: bool):
    return (lambda p: OptimizerInBackward(p, lr=1e-3)) if in_backward else (lambda p: build_adamw(p, lr=1e-3))


def peak(device, dims, *, seq_len=128, batch_size=2, accumulation=2, in_backward=False, **kwargs):
    """The tracked peak of two optimizer steps of a freshly built model on ``device``."""
    ac = kwargs.pop("activation_checkpointing", False)
    return estimate_step(build(device, dims, **kwargs), batch_size=batch_size, seq_len=seq_len,
                         loss_fn=ChunkedCrossEntropy(num_chunks=4), make_optimizer=make_optimizer(in_backward),
                         activation_checkpointing=ac, gradient_accumulation_steps=accumulation,
                         max_grad_norm=None if in_backward else 1.0)


def _allocated(nbytes: int) -> int:
    # what the CUDA caching allocator would hand out for a request: multiples of 512 bytes
    return -(-nbytes // 512) * 512


def _storage_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        parts = [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]] if is_nf4(tensor) else [tensor]
        for part in parts:
            storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
    return sum(_allocated(n) for n in storages.values())


def allocator_peak(dims, *, seq_len=128, batch_size=2, accumulation=2, in_backward=False,
                   activation_checkpointing=False, **kwargs) -> tuple[int, int]:
    """(peak, weights) of the same two optimizer steps as :func:`peak`, run as the recipes run them
    (``forward_backward``, clipping, the optimizer) on CPU tensors and measured independently of the
    tracker: the weights' storages counted directly, plus the largest running total of the CPU
    allocator's allocations and frees reported by ``torch.profiler`` during the steps."""
    from torch.profiler import ProfilerActivity, profile

    model = build("cpu", dims, **kwargs)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(in_backward)(trainable)
    tokens = torch.randint(0, dims["vocab_size"], (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    batch, loss_fn = {"tokens": tokens, "labels": tokens}, ChunkedCrossEntropy(num_chunks=4)
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for step in range(2):
            forward_backward(model, [batch] * (1 if step == 0 else accumulation), loss_fn, output_params(model))
            if not in_backward:  # optimizer-in-backward updated in the backward's hooks
                clip_grad_norm(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = top = 0
    for event in events:  # nbytes: + allocated, - freed
        live += _allocated(abs(event.nbytes())) * (1 if event.nbytes() > 0 else -1)
        top = max(top, live)
    return weights + top, weights


def assert_within_10_percent_above_the_weights(predicted, dims, **case):
    """The estimate of everything but the weights (activations, gradients, states, temporaries)
    is within 10% of the allocator's; the weights are the same bytes."""
    measured, weights = allocator_peak(dims, **case)
    assert sum(predicted.breakdown[k] for k in ("weights", "quantized_base", "adapters")) == weights
    assert abs((predicted.peak_bytes - weights) - (measured - weights)) <= 0.10 * (measured - weights), \
        (predicted.peak_bytes, measured, weights)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ac", "ac"])
@pytest.mark.parametrize("case", [
    dict(dims=TINY),
    dict(dims=TINY, adapters=False, dtype=torch.float32),  # full fine-tuning: gradients and AdamW states of all weights
    dict(dims=SMALL_NF4, qlora=True, seq_len=64, accumulation=1),
    dict(dims=SMALL_NF4, qlora="int8", seq_len=64, accumulation=1),  # int8 rows + scales: the quantized base too
    dict(dims=ONE_B_LAYER, batch_size=1, accumulation=1),
], ids=["tiny_lora", "tiny_full", "nf4", "int8", "1b_layer"])
def test_meta_estimate_within_10_percent_of_the_allocators_peak(case, checkpointing):
    case = dict(case, activation_checkpointing=checkpointing)
    dims = case.pop("dims")
    predicted = peak("meta", dims, **case)
    assert_within_10_percent_above_the_weights(predicted, dims, **case)
    assert predicted.breakdown["saved_activations"] > 0
    if case.get("qlora"):
        assert predicted.breakdown["quantized_base"] > 0
    if case.get("adapters", True):
        assert predicted.breakdown["adapters"] > 0 and predicted.breakdown["weights"] > 0


@pytest.mark.parametrize("case", [dict(qat="8da4w"), dict(qat="4w", adapters=False, dtype=torch.float32)],
                         ids=["8da4w_lora", "4w_full"])
def test_qat_estimate_within_10_percent_of_the_allocators_peak(case):
    """QAT's fake-quantized weight and input copies are in the estimate (more than without QAT) and it
    stays within 10% of the allocator's peak."""
    predicted = peak("meta", TINY, **case)
    assert_within_10_percent_above_the_weights(predicted, TINY, **case)
    without = peak("meta", TINY, **{k: v for k, v in case.items() if k != "qat"})
    assert predicted.breakdown["saved_activations"] > without.breakdown["saved_activations"]


def test_optimizer_in_backward_never_holds_all_gradients():
    full = dict(adapters=False, dtype=torch.float32, seq_len=16, batch_size=1, accumulation=1)
    plain = peak("meta", TINY, **full)
    in_backward = peak("meta", TINY, in_backward=True, **full)
    assert in_backward.peak_bytes < plain.peak_bytes
    assert in_backward.breakdown["gradients"] < plain.breakdown["gradients"] // 4
    assert_within_10_percent_above_the_weights(in_backward, TINY, in_backward=True, **full)


def test_checkpointing_keeps_only_layer_inputs():
    plain = peak("meta", ONE_B_LAYER, seq_len=1024, batch_size=1, accumulation=1)
    checkpointed = peak("meta", ONE_B_LAYER, seq_len=1024, batch_size=1, accumulation=1, activation_checkpointing=True)
    assert checkpointed.breakdown["saved_activations"] < plain.breakdown["saved_activations"] / 4


def test_memory_grows_linearly_in_the_sequence_length():
    # Attention is counted as a fused kernel keeps it (O(s)); a [s, s] score matrix would make the
    # second difference as large as the first.
    lengths = [16384, 32768, 49152]
    peaks = [peak("meta", TINY, seq_len=s, batch_size=1, accumulation=1, activation_checkpointing=True).peak_bytes
             for s in lengths]
    first = peaks[1] - peaks[0]
    assert first > 0
    assert abs((peaks[2] - peaks[1]) - first) <= 0.02 * first


def loss_and_grads(offload: bool):
    model = build("cpu", TINY, dtype=torch.float32)
    apply_activation_checkpointing(model)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    tracker = MemoryTracker()
    for p in model.parameters():
        tracker.track(p, "weights")
    with tracker:
        with offloaded_to_host(tracker, offload):
            hidden = model.hidden_states(tokens)
        loss, _ = ChunkedCrossEntropy(num_chunks=2)(hidden, shift_targets(tokens), model.output)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, tracker


def test_offloading_keeps_loss_and_gradients_and_moves_bytes_to_the_host():
    loss, grads, plain = loss_and_grads(offload=False)
    loss_off, grads_off, offloaded = loss_and_grads(offload=True)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], grads_off[name]), name
    assert plain.peak_host_bytes == 0 and offloaded.peak_host_bytes > 0
    assert offloaded.host_bytes == 0  # every host copy freed after backward


@pytest.mark.gpu
def test_activation_offloading_option_keeps_loss_and_gradients_on_cuda(monkeypatch):
    from torchft.training import activations

    monkeypatch.setattr(activations, "OFFLOAD_MIN_BYTES", 1024)  # the tiny model's tensors are KiBs

    def run(offload):
        model = build("cuda", TINY, dtype=torch.float32)
        tokens = torch.randint(0, 256, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        context = activation_offloading(offload, "cuda")
        with context:
            hidden = model.hidden_states(tokens)
        assert not offload or context.offloaded_bytes > 0
        loss, _ = ChunkedCrossEntropy(num_chunks=2)(hidden, shift_targets(tokens), model.output)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (loss, grads), (loss_off, grads_off) = run(False), run(True)
    assert torch.equal(loss, loss_off) and all(torch.equal(a, b) for a, b in zip(grads, grads_off))


def fsdp_case(dtype):
    model = build("meta", SMALL_NF4, adapters=False, dtype=dtype)
    layer_numel = sum(p.numel() for p in model.layers[0].parameters())
    root_numel = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers."))
    return model, peak("meta", SMALL_NF4, adapters=False, dtype=dtype), layer_numel, root_numel


def test_fsdp_per_rank_shards_state_and_adds_the_unsharded_layers():
    model, single, layer_numel, root_numel = fsdp_case(torch.float32)
    per_rank = fsdp_per_rank(single, model, world_size=4)
    assert per_rank.breakdown["all_gather_buffers"] == int(root_numel * 4 * 0.75) + 2 * layer_numel * 4
    # one layer's gradients and the reduce-scatter's copy of them
    assert per_rank.breakdown["reduce_scatter_buffers"] == 2 * layer_numel * 4
    assert per_rank.breakdown["weights"] == -(-single.breakdown["weights"] // 4)
    assert per_rank.breakdown["saved_activations"] == single.breakdown["saved_activations"]
    assert per_rank.peak_bytes == sum(per_rank.breakdown.values()) < single.peak_bytes
    assert per_rank.settings["nproc_per_node"] == 4 and per_rank.host_bytes == 0


def test_fsdp_cpu_offload_keeps_the_sharded_state_in_host_memory():
    model, single, _, _ = fsdp_case(torch.float32)
    on_gpu = fsdp_per_rank(single, model, world_size=4)
    offloaded = fsdp_per_rank(single, model, world_size=4, cpu_offload=True)
    sharded = ("weights", "gradients", "optimizer_states")
    assert all(offloaded.breakdown[kind] == 0 for kind in sharded)
    assert offloaded.host_bytes == sum(on_gpu.breakdown[kind] for kind in sharded) > 0
    assert offloaded.peak_bytes == on_gpu.peak_bytes - offloaded.host_bytes
    assert offloaded.settings["cpu_offload"] is True


def test_fsdp_fp32_reduce_adds_an_fp32_copy_of_a_layers_gradients():
    model, single, layer_numel, _ = fsdp_case(torch.bfloat16)
    plain = fsdp_per_rank(single, model, world_size=4)
    fp32 = fsdp_per_rank(single, model, world_size=4, reduce_dtype=torch.float32)
    assert plain.breakdown["reduce_scatter_buffers"] == layer_numel * (2 + 2)
    assert fp32.breakdown["reduce_scatter_buffers"] == layer_numel * (2 + 4)
    assert fp32.settings["fp32_reduce"] is True and plain.settings["fp32_reduce"] is False


TINY_CONFIG = """
model:
  _component_: torchft.models._llama.llama
  vocab_size: 256
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  embed_dim: 64
  intermediate_dim: 128
  max_seq_len: 4096
  lora_attn_modules: [q_proj, v_proj]
  apply_lora_to_mlp: true
tokenizer:
  max_seq_len: 1024
batch_size: 2
gradient_accumulation_steps: 1
optimizer:
  _component_: torchft.training.optim.build_adamw
  lr: 0.001
loss:
  _component_: torchft.modules.loss.ChunkedCrossEntropy
  num_chunks: 4
clip_grad_norm: 1.0
dtype: bf16
enable_activation_checkpointing: false
enable_activation_offloading: false
"""


@pytest.fixture
def tiny_config():
    return OmegaConf.create(TINY_CONFIG)


def test_ways_to_fit_takes_the_cheapest_settings_first(tiny_config):
    base = estimate_memory(tiny_config)
    checkpointed = estimate_memory(tiny_config, ["enable_activation_checkpointing=true"])
    # between the two: checkpointing alone is enough
    budget = (base.needed_bytes + checkpointed.needed_bytes) // 2
    overrides, fitted = ways_to_fit(tiny_config, (), budget)
    assert overrides == ["enable_activation_checkpointing=true"]
    assert fitted.peak_bytes == checkpointed.peak_bytes
    # a budget below checkpointing + offloading: the batch is split, tokens per step kept
    offloaded = estimate_memory(tiny_config, ["enable_activation_checkpointing=true",
                                              "enable_activation_offloading=true"])
    overrides, fitted = ways_to_fit(tiny_config, (), offloaded.needed_bytes - 1)
    assert overrides[:2] == ["enable_activation_checkpointing=true", "enable_activation_offloading=true"]
    assert "batch_size=1" in overrides[2:] and "gradient_accumulation_steps=2" in overrides[2:]
    assert ways_to_fit(tiny_config, (), 1) is None


def test_estimate_reads_the_config(tiny_config):
    estimate = estimate_memory(tiny_config, ["batch_size=1"])
    assert estimate.settings["batch_size"] == 1 and estimate.settings["seq_len"] == 1024
    assert estimate.peak_bytes < estimate_memory(tiny_config).peak_bytes
    with pytest.raises(ValueError, match=r"sets no tokenizer.max_seq_len"):
        estimate_memory(OmegaConf.merge(tiny_config, {"tokenizer": {"max_seq_len": None}}))


SHORT = ["tokenizer.max_seq_len=128"]  # the config-level checks need no long sequences


def test_estimate_reads_the_qat_section(tiny_config):
    plain = estimate_memory(tiny_config, SHORT)
    qat = estimate_memory(tiny_config, SHORT + ["+qat.scheme=8da4w", "+qat.group_size=32"])
    assert qat.breakdown["saved_activations"] > plain.breakdown["saved_activations"]


def test_distributed_estimate_runs_each_rank_on_its_share_of_the_global_batch(tiny_config):
    per_rank = estimate_memory(tiny_config, SHORT + ["batch_size=4"], nproc_per_node=4)
    one_sample = estimate_memory(tiny_config, SHORT + ["batch_size=1"])
    assert per_rank.breakdown["saved_activations"] == one_sample.breakdown["saved_activations"]
    assert per_rank.settings["batch_size"] == 4 and per_rank.settings["batch_size_per_rank"] == 1
    with pytest.raises(ValueError, match=r"batch_size \(6\) is the global batch and must be divisible by the "
                                         r"world size \(4\)"):
        estimate_memory(tiny_config, SHORT + ["batch_size=6"], nproc_per_node=4)


def test_distributed_estimate_follows_cpu_offload_and_fp32_reduce(tiny_config):
    plain = estimate_memory(tiny_config, SHORT + ["batch_size=4"], nproc_per_node=2)
    offloaded = estimate_memory(tiny_config, SHORT + ["batch_size=4", "+cpu_offload=true"], nproc_per_node=2)
    fp32 = estimate_memory(tiny_config, SHORT + ["batch_size=4", "+fp32_reduce=true"], nproc_per_node=2)
    assert offloaded.breakdown["weights"] == 0 and offloaded.host_bytes > 0 == plain.host_bytes
    assert offloaded.peak_bytes < plain.peak_bytes
    assert fp32.breakdown["reduce_scatter_buffers"] > plain.breakdown["reduce_scatter_buffers"]


def test_fit_advice_keeps_the_global_batch_divisible_by_the_ranks(tiny_config):
    plan = _plan(OmegaConf.merge(tiny_config, {"batch_size": 12}), nproc_per_node=4)
    batches = [int(c.split("=")[1]) for change in plan for c in change if c.startswith("batch_size=")]
    assert batches == [4]  # 3 per rank halved to 1 per rank; 6 would not split over 4 ranks


def test_estimate_includes_the_cublas_workspaces(tiny_config):
    estimate = estimate_memory(tiny_config, SHORT)
    assert estimate.breakdown["cublas_workspaces"] == CUBLAS_WORKSPACE_BYTES == 64 * 2**20
    assert estimate.peak_bytes == sum(estimate.breakdown.values())


def test_parse_memory_size():
    assert parse_memory_size("24GiB") == 24 * GIB
    assert parse_memory_size("80GB") == 80 * 10**9
    assert parse_memory_size("1.5 gib") == int(1.5 * GIB)
    with pytest.raises(ValueError, match=r"memory size '24XB' is not understood; write e.g. 24GiB"):
        parse_memory_size("24XB")


def test_warn_if_over_memory_names_the_cheapest_fix(tiny_config, monkeypatch, caplog):
    needed = estimate_memory(tiny_config).needed_bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (needed - 1, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    with caplog.at_level(logging.WARNING, logger="torchft"):
        warn_if_over_memory(tiny_config, torch.device("cuda"))
        warn_if_over_memory(tiny_config, torch.device("cpu"))  # nothing on the CPU
    [record] = caplog.records
    assert "exceeds the" in record.getMessage() and "try enable_activation_checkpointing=true" in record.getMessage()


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ac", "ac"])
def test_estimate_within_10_percent_of_cuda_max_memory_allocated(checkpointing):
    # the cuBLAS workspaces are allocated through the caching allocator, as the estimate of a config says
    predicted = with_cublas_workspaces(peak("meta", ONE_B_LAYER, seq_len=2048, batch_size=2, accumulation=1,
                                            activation_checkpointing=checkpointing))
    model = build("cuda", ONE_B_LAYER)
    if checkpointing:
        apply_activation_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(trainable, lr=1e-3)
    tokens = torch.randint(0, ONE_B_LAYER["vocab_size"], (2, 2048), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        forward_backward(model, [{"tokens": tokens, "labels": tokens}], ChunkedCrossEntropy(num_chunks=4),
                         output_params(model))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    assert abs(predicted.peak_bytes - measured) <= 0.10 * measured, (predicted.peak_bytes, measured)


def test_lora_dpo_estimate_holds_no_reference_weights_and_two_sequences_per_pair():
    """A DPO pair is a chosen and a rejected sequence; the LoRA reference is the base (adapters off)."""
    from pathlib import Path

    from torchft.training.estimate import estimate_memory

    configs = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "llama3_2"
    dpo = estimate_memory(str(configs / "1B_lora_dpo_single_device.yaml"), ["batch_size=1", "tokenizer.max_seq_len=256"])
    sft = estimate_memory(str(configs / "1B_lora_single_device.yaml"), ["batch_size=2", "tokenizer.max_seq_len=256"])
    assert dpo.breakdown["weights"] == sft.breakdown["weights"]
    # the same layers' activations (a few KiB more: the per-answer log-probabilities)
    assert dpo.breakdown["saved_activations"] == pytest.approx(sft.breakdown["saved_activations"], rel=1e-3)



def test_distributed_dpo_estimates_count_the_full_reference_copy_and_no_lora_one(tmp_path):
    """Per rank: full-weight DPO holds a frozen reference copy (its shard of the weights, once more); LoRA
    DPO's reference is the base with adapters off (no weights of its own), so its weights are the LoRA SFT
    config's; a pair is two sequences (the activations of the SFT config at twice the batch)."""
    from pathlib import Path

    from torchft.training.quickstart import tiny_base_model

    base = tiny_base_model(str(tmp_path / "base"), seed=0, pretrain_steps=0)
    quickstart = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "quickstart"
    tiny = ["~base_model", f"checkpointer.checkpoint_dir={base}", "tokenizer.max_seq_len=64"]
    estimate = lambda name, *extra: estimate_memory(str(quickstart / f"{name}.yaml"), [*tiny, *extra],  # noqa: E731
                                                    nproc_per_node=2)
    full, lora = estimate("full_dpo_distributed", "batch_size=2"), estimate("lora_dpo_distributed", "batch_size=2")
    sft = estimate("lora_distributed", "batch_size=4")
    model_bytes = full.breakdown["weights"]  # fp32 full weights: the policy's shard
    assert full.breakdown["reference_weights"] == pytest.approx(model_bytes, rel=0.02)
    assert "reference_weights" not in lora.breakdown and lora.breakdown["weights"] == sft.breakdown["weights"]
    assert lora.breakdown["saved_activations"] == pytest.approx(sft.breakdown["saved_activations"], rel=1e-2)
    simpo = estimate("full_dpo_distributed", "batch_size=2", "loss.loss_type=simpo")
    assert "reference_weights" not in simpo.breakdown  # reference-free: no copy
    precomputed = estimate("full_dpo_distributed", "batch_size=2", "+reference=precomputed")
    assert "reference_weights" not in precomputed.breakdown  # the copy is freed before the first step
    assert precomputed.peak_bytes == pytest.approx(full.peak_bytes - full.breakdown["reference_weights"], rel=1e-3)
