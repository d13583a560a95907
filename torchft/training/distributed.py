"""Data parallelism with PyTorch's own engine: torchrun processes, FSDP2 sharding, streamed weights.

The distributed recipes call, in this order::

    env = init_distributed("cuda", timeout_minutes=10)          # torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    local_batch = per_rank_batch_size(global_batch, env.world_size)
    with torch.device("meta"):
        model = build()                                          # nothing allocated
    check_nf4_shardable(model, env.shard_count)                  # before any work
    sharded = shard_model(model, env.mesh, ...)                  # fully_shard per decoder layer + root
    load_sharded_weights(model, state_dict, env.device, dtype)   # each rank keeps only its rows

``state_dict`` is the memory-mapped checkpoint (``HFCheckpointer.load_model_state_dict()``): each
weight is read, cast and cut to this rank's rows one at a time, so no rank ever holds more than its
shard plus one full tensor. NF4 base weights (QLoRA) are quantized whole, then split: every rank's
rows are exactly the rows a single device would hold. World size 1 with NF4 weights is not sharded
(FSDP2 fails on NF4 with a single shard): the model then loads as on one device. int8 base weights
are quantized whole too; their int8 rows shard like any parameter (any world size) and their
per-row scales ([out] floats per linear) stay whole on every rank, so each rank dequantizes exactly
the rows one device would.

The model code does not know it is sharded: FSDP2 gathers each layer's weights for its forward and
backward (``hidden_states`` and ``output`` are registered as forward methods, because the recipes
call those instead of ``forward``).
"""
from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

LAUNCH_HINT = "tune run --nproc_per_node <GPUs> {recipe} --config <config>"


class NotLaunchedError(ValueError):
    """A distributed recipe was started without torchrun."""


@dataclass
class DistributedEnv:
    """This process's place in the job: ``rank`` of ``world_size``, its ``device``, the device ``mesh``
    (1-D ``("shard",)``, or 2-D ``("replicate", "shard")`` for HSDP) and ``cpu_group``, a gloo group of
    every rank for decisions the host makes alone (None: the default group is gloo already)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    cpu_group: object = None  # torch.distributed.ProcessGroup
    timeout: datetime.timedelta | None = None  # of every collective (the config's timeout_minutes)

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def shard_count(self) -> int:
        """Ranks a weight is split over (the world size, or the size of a node group under HSDP)."""
        return self.mesh["shard"].size() if self.mesh.ndim > 1 else self.mesh.size()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_distributed(device: str = "cuda", *, timeout_minutes: float = 10.0, replicas: int = 1,
                     recipe: str = "<recipe>") -> DistributedEnv:
    """Join the torchrun job: one process per device, gloo on CPU, NCCL on CUDA.

    ``timeout_minutes`` bounds every collective: a rank that hangs ends the job after it (the default
    process group waits 30 minutes). ``replicas`` > 1 builds an HSDP mesh: weights are replicated over
    ``replicas`` groups (nodes) and sharded inside each.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not launched_by_torchrun():
        raise NotLaunchedError(f"{recipe} is a distributed recipe: launch it with torchrun, e.g. "
                               f"`{LAUNCH_HINT.format(recipe=recipe)}` (--nproc_per_node 1 for one device)")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size % replicas != 0:
        raise ValueError(f"replicas ({replicas}) must divide the world size ({world_size})")
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu (gloo) to run on CPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if backend == "nccl" else None)
    if replicas > 1:
        mesh = init_device_mesh(dev.type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("shard",))
    # NCCL reduces GPU tensors only: the per-step stop decision goes over gloo, so it never waits for the GPU
    timeout = datetime.timedelta(minutes=timeout_minutes)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return DistributedEnv(rank, world_size, local_rank, dev, mesh, cpu_group, timeout)


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """``batch_size`` of a distributed config is global (the samples of one micro-batch over all
    ranks), so a run gives the same updates at any world size; each rank takes its share."""
    if global_batch_size % world_size != 0:
        below = global_batch_size // world_size * world_size  # the multiples of the world size around it
        nearest = [n for n in (below, below + world_size) if n > 0]
        working = [n for n in range(1, global_batch_size + 1) if global_batch_size % n == 0]
        raise ValueError(f"batch_size ({global_batch_size}) is the global batch and must be divisible by the "
                         f"world size ({world_size}); nearest batch sizes that work: "
                         f"{' or '.join(map(str, nearest))}; world sizes that work: {', '.join(map(str, working))}")
    return global_batch_size // world_size


# ------------------------------------------------------------------------------------------ NF4 rule
def nf4_shard_counts(shape: Sequence[int], limit: int = 1024) -> list[int]:
    """Shard counts a weight of ``shape`` can be split over as NF4: dim 0 divisible by the count and
    the element count divisible by 16384 x the count (each shard holds whole blocks and scale blocks)."""
    from torchft.modules.peft._nf4 import NF4_NUMEL_MULTIPLE

    numel = math.prod(shape)
    if numel % NF4_NUMEL_MULTIPLE:
        return []
    common = math.gcd(shape[0], numel // NF4_NUMEL_MULTIPLE)
    return [n for n in range(1, min(common, limit) + 1) if common % n == 0]


def check_nf4_shardable(model: nn.Module, shard_count: int) -> None:
    """Refuse, before any weight is read, an NF4 weight that cannot be split over ``shard_count`` ranks."""
    from torchft.modules.peft.frozen_linear import FrozenLinear

    if shard_count == 1:
        return
    for name, module in model.named_modules():
        if isinstance(module, FrozenLinear) and module.base_format == "nf4":
            shape = (module.out_dim, module.in_dim)
            counts = nf4_shard_counts(shape)
            if shard_count not in counts:
                raise ValueError(
                    f"{name}.weight ({shape[0]}x{shape[1]}) cannot be sharded as NF4 over {shard_count} ranks "
                    f"(dim 0 must be divisible by the shard count and the element count by 16384 x the shard "
                    f"count); shard counts that work: {', '.join(map(str, counts)) or 'none'}")


def has_nf4_weights(model: nn.Module) -> bool:
    from torchft.modules.peft.frozen_linear import FrozenLinear

    return any(isinstance(m, FrozenLinear) and m.base_format == "nf4" for m in model.modules())


# ------------------------------------------------------------------------------------------ sharding
def check_cpu_offload(cpu_offload: bool, device: torch.device) -> None:
    """``cpu_offload`` moves GPU shards to host memory: on CPU processes there is nothing to move (and
    FSDP2's offload policy needs an accelerator), so the setting is refused in one line."""
    from torchft.config import ConfigError

    if cpu_offload and torch.device(device).type != "cuda":
        raise ConfigError(f"cpu_offload=true keeps the GPU shards in host memory and needs device=cuda; on "
                          f"device={torch.device(device).type} the weights are in host memory already: "
                          f"set cpu_offload=false")


def shard_model(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                reshard_after_forward: bool = True) -> bool:
    """``fully_shard`` each decoder layer, then the root (embedding, final norm and ``lm_head`` or the
    tied embedding stay in the root unit: the fused chunked cross-entropy needs the output projection
    there). Apply after activation checkpointing and compile. Returns False, leaving the model whole,
    for NF4 weights on a single shard (see the module docstring).

    ``param_dtype``: the dtype of the gathered weights in forward/backward (None: as stored);
    ``reduce_dtype``: the dtype gradients are reduced in (e.g. fp32 under bf16 weights);
    ``cpu_offload``: keep the sharded weights, gradients and optimizer state in CPU memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method

    shard_count = mesh["shard"].size() if mesh.ndim > 1 else mesh.size()
    if shard_count == 1 and has_nf4_weights(model):
        if mesh.size() > 1:  # replicas without sharding would need FSDP2 on NF4 with a single shard
            raise ValueError(f"NF4 base weights need at least 2 ranks per shard group: replicas "
                             f"({mesh.size()}) must be below the world size ({mesh.size()}) for QLoRA")
        return False
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                   offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    # The root stays gathered from forward to backward: the fused loss differentiates its output
    # projection's gathered parameters, which must be the same tensors in every chunk.
    fully_shard(model, reshard_after_forward=False, **options)
    for method in ("hidden_states", "output"):  # called by the recipes instead of forward()
        register_fsdp_forward_method(model, method)
    return True


def _shard_nf4(nf4: torch.Tensor, meta_param) -> torch.Tensor:
    """This rank's rows of a whole NF4 weight [out, in] (a DTensor like ``meta_param``).

    Splitting the quantized tensor (not quantizing each shard) keeps the blocks and scales of the
    whole weight, so every rank holds exactly the rows a single device would.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh, placements = meta_param.device_mesh, meta_param.placements
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    local = nf4
    for mesh_dim in shard_dims:
        local = torch.chunk(local, mesh.size(mesh_dim), dim=0)[mesh.get_local_rank(mesh_dim)]
    return DTensor.from_local(local, mesh, placements, run_check=False)


def _fresh_adapters(module, base_weight: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """A LoRA/DoRA layer's initial adapters as full tensors (the draws of ``initialize_adapters`` on one
    device, in the same order): A Kaiming-uniform [r, in], B zero [out, r], DoRA magnitude [out]."""
    from torchft.modules.peft import DoRALinear
    from torchft.modules.peft._nf4 import dequantize

    lora_a = torch.empty(module.lora_a.weight.shape, dtype=module.lora_a.weight.dtype, device=device)
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    lora_b = torch.zeros(module.lora_b.weight.shape, dtype=module.lora_b.weight.dtype, device=device)
    adapters = {"lora_a.weight": lora_a, "lora_b.weight": lora_b}
    if isinstance(module, DoRALinear):
        delta = module.scaling * (lora_b.float() @ lora_a.float())  # zero: B starts at zero
        norm = torch.linalg.norm(dequantize(base_weight).float() + delta, dim=1)  # [out]
        adapters["magnitude"] = norm.to(module.magnitude.dtype)
    return adapters


@torch.no_grad()
def load_sharded_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device,
                         dtype: torch.dtype, *, fresh_adapters: bool = False) -> None:
    """Fill a sharded model built on ``meta`` from a (memory-mapped) full ``state_dict``, one tensor at a time.

    Each rank reads a weight, casts it to ``dtype`` on ``device`` and keeps its own rows (no
    communication: every rank reads the same files). With ``fresh_adapters`` the LoRA/DoRA adapters
    are initialized on every rank from the same seed, as ``initialize_adapters`` does on one device,
    and rank 0's values are scattered so that every rank starts from the same adapters.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from torchft.modules.peft import LoRALinear, _int8
    from torchft.modules.peft.frozen_linear import FrozenLinear

    pending: dict[str, torch.Tensor] = {}  # fresh adapters of a layer, placed when its children are visited
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in list(module.named_parameters(recurse=False)):
            key = prefix + name
            if key in pending:
                full, from_rank0 = pending.pop(key), True
            elif key in state_dict:
                full, from_rank0 = state_dict[key].to(device=device, dtype=dtype), False
            else:
                continue  # adapters left for a later load (a resumed run's DCP checkpoint)
            quantized = isinstance(module, FrozenLinear) and name == "weight" and module.quantize_base
            nf4, scale = quantized and module.base_format == "nf4", None
            if quantized:  # quantize the whole weight first: shards are rows of it, DoRA norms are of it
                full, scale = module._quantize(full)  # int8: scales [out], kept whole on every rank
            if fresh_adapters and isinstance(module, LoRALinear) and name == "weight":
                base = full if scale is None else _int8.dequantize(full, scale)
                for adapter_key, value in _fresh_adapters(module, base, device).items():
                    pending[prefix + adapter_key] = value
            if isinstance(param, DTensor):
                if nf4:
                    value = _shard_nf4(full, param)
                else:  # plain or int8 rows: FSDP2's own split
                    value = distribute_tensor(full, param.device_mesh, param.placements,
                                              src_data_rank=0 if from_rank0 else None)
            else:  # a model left whole (NF4 at world size 1)
                value = full
            if quantized:
                module.set_quantized_weight(value, scale)
            else:
                module.register_parameter(name, nn.Parameter(value, requires_grad=param.requires_grad))
            del full
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta and prefix + name in state_dict:
                module.register_buffer(name, state_dict[prefix + name].to(device))
    if pending:
        raise ValueError(f"adapters without a base layer: {', '.join(sorted(pending)[:5])}")




def check_loaded(model: nn.Module) -> None:
    """Every parameter and buffer was loaded (none left on ``meta``)."""
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(f"weights not loaded (still on meta): {', '.join(on_meta[:5])}")


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (its shards; NF4 counted packed)."""
    from torch.distributed.tensor import DTensor

    from torchft.modules.peft._nf4 import tensor_bytes

    return sum(tensor_bytes(p.to_local() if isinstance(p, DTensor) else p) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over all ranks (a no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is True on any rank (the same stop decision everywhere).

    The flag is a CPU tensor reduced on ``group``, a gloo group (``DistributedEnv.cpu_group``; None:
    the default group, which must then be gloo): the training loop decides this every step, and a
    flag on the GPU would make every step wait for the device before the host could read it.
    """
    flags = torch.tensor([int(flag)], dtype=torch.int32)  # [1], host memory
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags.numpy()[0])  # read from host memory: no device op
