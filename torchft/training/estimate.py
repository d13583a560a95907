"""Predict the peak GPU memory of a fine-tuning config before running it (``tune estimate``).

The recipe's model is built on the ``meta`` device (dimensions from the builder, its preset or the
checkpoint folder's config.json; no weights are read) and one training step runs on it: the same
forward, fused chunked cross-entropy, backward, gradient clipping and AdamW update, with the
config's activation checkpointing and offloading. :mod:`torchft.training.estimate_tracking` counts
the live bytes of every tensor by kind; the largest total is the predicted peak of
``torch.cuda.max_memory_allocated``. Two optimizer steps run (the second with the optimizer states
alive), each of ``min(gradient_accumulation_steps, 2)`` micro-batches (the second with gradients
alive), every sample ``max_seq_len`` tokens long and every position a target: the worst case.

The cuBLAS workspaces a CUDA run allocates through the caching allocator are added to the peak
(:data:`CUBLAS_WORKSPACE_BYTES`, kind ``cublas_workspaces``). The allocator's overhead on top
(fragmentation, the CUDA context) is not tracked; ``needed_bytes`` adds :data:`FRAGMENTATION` and
:data:`CUDA_CONTEXT_BYTES` to decide whether a config fits.

    from torchft.training.estimate import estimate_memory
    estimate = estimate_memory("llama3_2/1B_lora_single_device", ["batch_size=8"])
    estimate.peak_bytes, estimate.breakdown, estimate.fits(24 * 2**30)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from torchft.training.estimate_tracking import KINDS, FusedKernels, MemoryTracker, offloaded_to_host

GIB = 2**30
# Reserved beyond allocated bytes in the caching allocator (blocks split and not reused), assumed.
FRAGMENTATION = 0.05
# The CUDA context, cuDNN and the NCCL buffers: present, never allocated by torch's caching allocator.
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
# cuBLAS workspaces, allocated through the caching allocator (so in max_memory_allocated): 32 MiB per
# handle on Hopper (torch's default CUBLAS_WORKSPACE_CONFIG there, :4096:8; older GPUs take 8 MiB, so
# this is the larger case), one handle per thread: the forward's and the autograd engine's backward thread.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20

log = logging.getLogger("torchft")


@dataclasses.dataclass
class MemoryEstimate:
    """Predicted memory of one training step.

    ``peak_bytes``: live device bytes at the peak (what ``torch.cuda.max_memory_allocated`` reports);
    ``breakdown``: those bytes by kind (:data:`~torchft.training.estimate_tracking.KINDS`, plus
    ``cublas_workspaces`` and, per rank of FSDP2, ``all_gather_buffers`` and ``reduce_scatter_buffers``);
    ``host_bytes``: peak host (pinned CPU) bytes of offloaded activations, plus the sharded state a
    ``cpu_offload`` FSDP2 rank keeps in CPU memory; ``settings``: what was estimated.
    """

    peak_bytes: int
    breakdown: dict[str, int]
    host_bytes: int
    settings: dict[str, Any]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def host_gib(self) -> float:
        return self.host_bytes / GIB

    @property
    def needed_bytes(self) -> int:
        """GPU memory the run needs: the peak plus the allocator overhead assumed."""
        return int(self.peak_bytes * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def fits(self, gpu_bytes: int) -> bool:
        return self.needed_bytes <= gpu_bytes

    def to_dict(self, gpu_bytes: int | None = None) -> dict[str, Any]:
        """The JSON shape of ``tune estimate --json`` (sizes in GiB)."""
        return {
            "peak_gib": round(self.peak_gib, 6),
            "needed_gib": round(self.needed_bytes / GIB, 6),
            "host_gib": round(self.host_gib, 6),
            "fits": None if gpu_bytes is None else self.fits(gpu_bytes),
            "gpu_gib": None if gpu_bytes is None else round(gpu_bytes / GIB, 3),
            "breakdown": {kind: round(nbytes / GIB, 6) for kind, nbytes in self.breakdown.items()},
            "settings": dict(self.settings),
            "allocator_overhead": {"fragmentation": FRAGMENTATION, "cuda_context_gib": CUDA_CONTEXT_BYTES / GIB,
                                   "cublas_workspaces_gib_in_peak": CUBLAS_WORKSPACE_BYTES / GIB},
        }


# ---- one tracked step ---------------------------------------------------------------------------
def estimate_step(model: nn.Module, *, batch_size: int, seq_len: int, loss_fn,
                  make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                  activation_checkpointing: bool = False, offload_activations: bool = False,
                  gradient_accumulation_steps: int = 1, max_grad_norm: float | None = None,
                  tiled_mlp_tokens: int | None = None) -> MemoryEstimate:
    """Run two tracked optimizer steps of ``model`` (on ``meta`` or real tensors) and return the peak.

    ``model``'s trainable parameters are those with ``requires_grad``; ``loss_fn`` is a
    :class:`~torchft.modules.loss.ChunkedCrossEntropy`; ``make_optimizer(trainable)`` builds the optimizer.
    Real tensors give the measured peak of the same step, tracked the same way (the accuracy test).
    ``tiled_mlp_tokens``: the MLP runs in sequence tiles (its ``[b, s, intermediate]`` activations one
    tile at a time).
    """
    from torchft.modules.loss import output_params, shift_targets
    from torchft.modules.peft import get_lora_modules
    from torchft.training.activations import apply_activation_checkpointing, apply_tiled_mlp
    from torchft.training.optim import clip_grad_norm

    device = next(model.parameters()).device
    if tiled_mlp_tokens is not None:
        apply_tiled_mlp(model, int(tiled_mlp_tokens))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_model = bool(get_lora_modules(model))
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)  # [b, s]
    targets = shift_targets(tokens)
    loss_params = output_params(model)
    micro_batches = min(gradient_accumulation_steps, 2)
    tracker = MemoryTracker()
    quantized = {id(t) for m in model.modules() if getattr(m, "base_format", None) == "int8"
                 for t in (m.weight, m.weight_scale)}  # int8 base rows and their scales
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        kind = "adapters" if adapter_model and tensor.requires_grad else "weights"
        tracker.track(tensor, "quantized_base" if id(tensor) in quantized else kind)
    teacher = getattr(loss_fn, "teacher", None)  # knowledge distillation: the frozen teacher's weights
    for tensor in [] if teacher is None else [*teacher.parameters(), *teacher.buffers()]:
        tracker.track(tensor, "teacher_weights")
    # Around the optimizer's own hooks (optimizer-in-backward updates in them), the update counts as
    # one fused kernel, as in the optimizer phase.
    phases: list[str] = []

    def before_update(param: nn.Parameter) -> None:
        tracker.track(param.grad, "gradients", retag=True)
        phases.append(tracker.switch_phase("optimizer"))

    def after_update(param: nn.Parameter) -> None:
        tracker.switch_phase(phases.pop())
        tracker.update_peak()

    handles = [p.register_post_accumulate_grad_hook(before_update) for p in trainable]
    optimizer = make_optimizer(trainable)  # allocates no state before its first step
    handles += [p.register_post_accumulate_grad_hook(after_update) for p in trainable]
    tracker.update_peak()

    with tracker, FusedKernels(tracker):
        for step in range(2):
            for _ in range(1 if step == 0 else micro_batches):
                with tracker.phase("forward"), offloaded_to_host(tracker, offload_activations):
                    _reference_forward(model, tokens, loss_fn)
                    hidden = model.hidden_states(tokens)  # [b, s, dim]
                with tracker.phase("loss"):
                    loss_sum = _step_loss(model, hidden, tokens, targets, loss_fn, loss_params)
                with tracker.phase("backward"):
                    _backward(loss_sum / targets.numel())
                del hidden, loss_sum
            with tracker.phase("optimizer"):
                clip_grad_norm(trainable, max_grad_norm)
                optimizer.step()
                _track_optimizer_states(tracker, optimizer)
            with tracker.phase("setup"):
                optimizer.zero_grad(set_to_none=True)
    for handle in handles:
        handle.remove()
    settings = {"batch_size": batch_size, "seq_len": seq_len, "gradient_accumulation_steps": gradient_accumulation_steps,
                "activation_checkpointing": activation_checkpointing, "activation_offloading": offload_activations,
                "tiled_mlp_tokens": tiled_mlp_tokens, "trainable_params": sum(p.numel() for p in trainable)}
    return MemoryEstimate(tracker.peak_bytes, tracker.peak_breakdown(), tracker.peak_host_bytes, settings)


def _is_preference(loss_fn) -> bool:
    return hasattr(loss_fn, "needs_reference")


def _reference_forward(model: nn.Module, tokens: torch.Tensor, loss_fn) -> None:
    """DPO/IPO with LoRA: the reference is the same model with adapters disabled, run without gradients
    (its activations are freed at once; it holds no weights of its own)."""
    from torchft.modules.loss import shift_targets
    from torchft.modules.peft import disable_adapter

    if _is_preference(loss_fn) and loss_fn.needs_reference:
        with torch.no_grad(), disable_adapter(model):
            loss_fn.log_probs(model.hidden_states(tokens), shift_targets(tokens), model.output)


def _step_loss(model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, loss_fn,
               loss_params) -> torch.Tensor:
    """[] the summed loss of one micro-batch: cross-entropy, a preference loss over its rows as pairs, or
    distillation (the teacher's forward and its chunks of logits count in the loss phase)."""
    if getattr(loss_fn, "uses_batch", False):
        return loss_fn(hidden, targets, model.output, loss_params, batch={"tokens": tokens})[0]
    if _is_preference(loss_fn):
        log_probs, lengths = loss_fn.log_probs(hidden, targets, model.output)  # [2b], [2b]
        return loss_fn(log_probs, lengths, log_probs.detach() if loss_fn.needs_reference else None)[0].sum()
    return loss_fn(hidden, targets, model.output, loss_params)[0]


def _backward(loss: torch.Tensor) -> None:
    # Straight into the autograd engine: ``loss.backward()`` would enter FusedKernels' handler, which
    # runs with the mode off, and the recomputation of checkpointed layers must see the mode.
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def _track_optimizer_states(tracker: MemoryTracker, optimizer) -> None:
    # torch optimizers keep {param: {name: tensor}}; OptimizerInBackward keeps one optimizer per param.
    optimizers = getattr(optimizer, "_optimizers", [optimizer])
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                tracker.track(value, "optimizer_states", retag=True)
    tracker.update_peak()


# ---- from a config ------------------------------------------------------------------------------
def _sequence_length(cfg) -> int:
    for node in ("tokenizer", "dataset"):
        value = (cfg.get(node) or {}).get("max_seq_len")
        if value:
            return int(value)
    raise ValueError("the config sets no tokenizer.max_seq_len (or dataset.max_seq_len): the estimate needs the "
                     "longest sequence; add e.g. tokenizer.max_seq_len=2048")


def _build_meta_model(model_node, dtype: torch.dtype) -> nn.Module:
    from torchft.config import instantiate
    from torchft.modules.peft import get_adapter_params, get_lora_modules, set_trainable_params
    from torchft.training.setup import default_dtype

    try:
        with torch.device("meta"), default_dtype(dtype):
            model = instantiate(model_node)
    except FileNotFoundError as err:
        raise ValueError(f"model: {err} (the estimate reads the model's dimensions from it; point "
                         "checkpointer.checkpoint_dir at a downloaded model, or use a preset builder)") from None
    if get_lora_modules(model):
        set_trainable_params(model, get_adapter_params(model))  # only the adapters train
    return model


def _config_with(config, overrides: Sequence[str]):
    """A copy of ``config`` (DictConfig, shipped name or YAML path) with ``overrides`` applied."""
    from omegaconf import DictConfig

    from torchft.config import apply_overrides, load_config

    if isinstance(config, DictConfig):
        return apply_overrides(config.copy(), overrides) if overrides else config.copy()
    return load_config(config, overrides)


def estimate_memory(config, overrides: Sequence[str] = (), *, nproc_per_node: int = 1) -> MemoryEstimate:
    """Predicted peak memory per GPU of a fine-tuning config (shipped name, YAML path or DictConfig).

    ``overrides``: ``key=value`` strings as on the command line. ``nproc_per_node`` > 1 gives the
    per-rank peak of a distributed run: ``batch_size`` is then the global batch, each rank runs
    ``batch_size / nproc_per_node`` samples, and the config's ``cpu_offload`` and ``fp32_reduce``
    apply (see :func:`fsdp_per_rank`). The peak includes the cuBLAS workspaces of a CUDA run.
    """
    from torchft.config import instantiate
    from torchft.training.distributed import per_rank_batch_size
    from torchft.training.optim import OptimizerInBackward
    from torchft.training.precision import resolve_dtype

    cfg = _config_with(config, overrides)
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) must be >= 1")
    local_batch = per_rank_batch_size(int(cfg.batch_size), nproc_per_node)
    dtype = resolve_dtype(cfg.get("dtype", "bf16"), "cpu")
    model = _build_meta_model(cfg.model, dtype)
    if cfg.get("qat") is not None:
        # QAT (docs/qat.md), fake quantization on: its memory is what the meta step then runs. The rule:
        # per fake-quantized linear, backward keeps the fake-quantized weight [out, in] (for LoRA the
        # merged one) and, for 8da4w, the fake-quantized input [b, s, in] beside the plain one; the
        # quantize-dequantize temporaries live within the layer's forward.
        from torchft.training.qat import apply_qat, qat_settings

        apply_qat(model, qat_settings(cfg.qat))

    if cfg.get("optimizer_in_backward", False):
        opt_kwargs = {k: v for k, v in cfg.optimizer.items() if k != "_component_"}
        make_optimizer = lambda params: OptimizerInBackward(params, **opt_kwargs)  # noqa: E731
    else:
        make_optimizer = lambda params: instantiate(cfg.optimizer, params)  # noqa: E731
    preference = cfg.loss._component_.endswith("PreferenceLoss")
    loss_fn = instantiate(cfg.loss) if preference else instantiate(cfg.loss, compile=False)
    if cfg.get("teacher_model") is not None:  # knowledge distillation: a frozen teacher runs every micro-batch
        from torchft.training.distillation import TeacherDistillation

        loss_fn = TeacherDistillation(_build_meta_model(cfg.teacher_model, dtype).requires_grad_(False), loss_fn)
    # a preference batch of b pairs is 2b sequences (chosen and rejected)
    estimate = estimate_step(
        model, batch_size=2 * local_batch if preference else local_batch, seq_len=_sequence_length(cfg),
        loss_fn=loss_fn,
        make_optimizer=make_optimizer,
        activation_checkpointing=bool(cfg.get("enable_activation_checkpointing", False)),
        offload_activations=bool(cfg.get("enable_activation_offloading", False)),
        gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps", 1)),
        max_grad_norm=cfg.get("clip_grad_norm"), tiled_mlp_tokens=cfg.get("tiled_mlp_tokens"))
    estimate.settings.update(model=cfg.model._component_, batch_size=int(cfg.batch_size))
    if nproc_per_node > 1:
        estimate.settings["batch_size_per_rank"] = local_batch
        estimate = fsdp_per_rank(estimate, model, nproc_per_node, cpu_offload=bool(cfg.get("cpu_offload", False)),
                                 reduce_dtype=torch.float32 if cfg.get("fp32_reduce", False) else None)
    # reference: precomputed frees the frozen copy before the first step (training then peaks without it)
    if preference and instantiate(cfg.loss).needs_reference and cfg.get("reference", "model") != "precomputed":
        estimate = with_reference_weights(estimate, model, nproc_per_node)
    return with_cublas_workspaces(estimate)


def with_reference_weights(estimate: MemoryEstimate, model: nn.Module, nproc_per_node: int) -> MemoryEstimate:
    """Full-weight DPO/IPO holds a frozen copy of the model as its reference (sharded over the ranks): its
    weights are added (kind ``reference_weights``). A LoRA reference is the same weights with the adapters
    disabled and adds nothing."""
    if any(".lora_" in name for name, _ in model.named_parameters()):
        return estimate
    size = sum(p.numel() * p.element_size() for p in model.parameters()) // nproc_per_node
    breakdown = {**estimate.breakdown, "reference_weights": size}
    return dataclasses.replace(estimate, peak_bytes=estimate.peak_bytes + size, breakdown=breakdown)


def with_cublas_workspaces(estimate: MemoryEstimate) -> MemoryEstimate:
    """``estimate`` with the cuBLAS workspaces of a CUDA run added to its peak (kind ``cublas_workspaces``)."""
    breakdown = {**estimate.breakdown, "cublas_workspaces": CUBLAS_WORKSPACE_BYTES}
    return dataclasses.replace(estimate, peak_bytes=estimate.peak_bytes + CUBLAS_WORKSPACE_BYTES, breakdown=breakdown)


# ---- distributed --------------------------------------------------------------------------------
_SHARDED_KINDS = ("weights", "quantized_base", "adapters", "gradients", "optimizer_states")


def fsdp_per_rank(estimate: MemoryEstimate, model: nn.Module, world_size: int, *, cpu_offload: bool = False,
                  reduce_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Per-rank peak under FSDP2 (``fully_shard`` per decoder layer + root) on ``world_size`` ranks,
    from ``estimate``: one rank's step, already taken with its share of the batch.

    Parameters, gradients and optimizer states are split ``world_size`` ways (with ``cpu_offload``
    they live in host memory instead); activations are those of the rank's own batch. On top: the
    root's parameters (embedding, final norm, output) unsharded for the whole step, two decoder
    layers unsharded at a time (the one computing and the next one being all-gathered), and one
    layer's gradients before their reduce-scatter, beside the reduce-scatter's copy of them in
    ``reduce_dtype`` (fp32 with ``fp32_reduce``; None: the gradients' own dtype).
    """
    from torchft.modules.peft._nf4 import tensor_bytes

    layers = list(model.layers)
    layer_bytes = max(sum(tensor_bytes(p) for p in layer.parameters()) for layer in layers)
    trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
    layer_grad_bytes = max(sum(tensor_bytes(p) for p in params) for params in trainable)
    reduce_bytes = max(sum(p.numel() * (reduce_dtype or p.dtype).itemsize for p in params) for params in trainable)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root_bytes = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in in_layers)
    breakdown = dict(estimate.breakdown)
    sharded = {kind: -(-breakdown[kind] // world_size) for kind in _SHARDED_KINDS}
    breakdown.update(dict.fromkeys(_SHARDED_KINDS, 0) if cpu_offload else sharded)
    if "teacher_weights" in breakdown:  # sharded the same way, never offloaded
        breakdown["teacher_weights"] = -(-breakdown["teacher_weights"] // world_size)
    breakdown["all_gather_buffers"] = int(root_bytes * (1 - 1 / world_size)) + 2 * layer_bytes
    breakdown["reduce_scatter_buffers"] = layer_grad_bytes + reduce_bytes
    # each rank offloads the activations of its own batch; cpu_offload adds its sharded state
    host_bytes = estimate.host_bytes + (sum(sharded.values()) if cpu_offload else 0)
    settings = {**estimate.settings, "nproc_per_node": world_size, "cpu_offload": cpu_offload,
                "fp32_reduce": reduce_dtype is torch.float32}
    return MemoryEstimate(sum(breakdown.values()), breakdown, host_bytes, settings)


# ---- what makes it fit --------------------------------------------------------------------------
def _plan(cfg, nproc_per_node: int = 1) -> list[list[str]]:
    """Changes that lower memory, cheapest first; each list of overrides applies on top of the previous.
    Batch sizes stay divisible by ``nproc_per_node`` (a distributed batch is global)."""
    plan = []
    if not cfg.get("enable_activation_checkpointing", False):
        plan.append(["enable_activation_checkpointing=true"])
    if not cfg.get("enable_activation_offloading", False):
        plan.append(["enable_activation_offloading=true"])
    local, accum = int(cfg.batch_size) // nproc_per_node, int(cfg.get("gradient_accumulation_steps", 1))
    while local > 1:
        local, accum = local // 2, accum * 2  # the same tokens per optimizer step
        plan.append([f"batch_size={local * nproc_per_node}", f"gradient_accumulation_steps={accum}"])
    component = str(cfg.model._component_)
    leaf = component.rsplit(".", 1)[-1]
    if leaf.startswith("lora_"):
        plan.append([f"model={component[:-len(leaf)]}q{leaf}"])
    seq = _sequence_length(cfg)
    key = "tokenizer.max_seq_len" if (cfg.get("tokenizer") or {}).get("max_seq_len") else "dataset.max_seq_len"
    while seq > SHORTEST_ADVISED_SEQ:
        seq //= 2
        plan.append([f"{key}={seq}"])
    return plan


SHORTEST_ADVISED_SEQ = 512  # the advice halves longer sequences down to this length, never below


def shortest_advised_seq(seq_len: int) -> int:
    """The sequence length the last step of the advice tries: ``seq_len`` halved while over 512."""
    while seq_len > SHORTEST_ADVISED_SEQ:
        seq_len //= 2
    return seq_len


def ways_to_fit(config, overrides: Sequence[str], gpu_bytes: int, *,
                nproc_per_node: int = 1) -> tuple[list[str], MemoryEstimate] | None:
    """The first settings (cheapest first, each change kept) with which the config fits in
    ``gpu_bytes``: (overrides to add, their estimate), or None when even all of them do not fit."""
    cfg = _config_with(config, overrides)
    added: list[str] = []
    for change in _plan(cfg, nproc_per_node):
        # a later change to the same key (batch size halved again) replaces the earlier one
        keys = {c.split("=", 1)[0] for c in change}
        added = [a for a in added if a.split("=", 1)[0] not in keys] + change
        estimate = estimate_memory(cfg, added, nproc_per_node=nproc_per_node)
        if estimate.fits(gpu_bytes):
            return added, estimate
    return None


# ---- sizes and the recipes' warning ---------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str) -> int:
    """``24GiB``, ``80GB``, ``40 gb`` or a byte count -> bytes (GB is 10**9, GiB 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r} is not understood; write e.g. 24GiB, 80GB or 40000000000")
    return int(float(match.group(1)) * _UNITS[unit])


def warn_if_over_memory(cfg, device: torch.device) -> None:
    """On CUDA, one warning line before training when the estimated peak exceeds the GPU's free
    memory, naming the cheapest settings that fit. Never stops a run (an estimate that fails is
    logged at debug level only)."""
    if torch.device(device).type != "cuda":
        return
    try:
        free, _ = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_allocated(device)  # the model is already loaded
        ranks = int(os.environ.get("WORLD_SIZE", 1))  # FSDP shards over every rank of a torchrun
        estimate = estimate_memory(cfg, nproc_per_node=ranks)
        if estimate.fits(available):
            return
        fix = ways_to_fit(cfg, (), available, nproc_per_node=ranks)
        advice = (f"try {' '.join(fix[0])} (estimated {fix[1].peak_gib:.1f} GiB)" if fix
                  else "no setting found that fits; use a GPU with more memory")
        log.warning("estimated peak %.1f GiB (+ allocator overhead) exceeds the %.1f GiB free on %s: %s",
                    estimate.peak_gib, available / GIB, device, advice)
    except Exception as err:  # noqa: BLE001 - an estimate must never stop training
        log.debug("memory estimate skipped: %s", err)


__all__ = ["CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "FRAGMENTATION", "KINDS", "MemoryEstimate", "estimate_memory", "estimate_step",
           "fsdp_per_rank", "parse_memory_size", "warn_if_over_memory", "ways_to_fit",
           "with_cublas_workspaces"]
