"""Optimizers: AdamW (fused; stochastic rounding on bf16 weights), optimizer-in-backward, clipping.

bf16 weights cannot take small updates: an AdamW step of ``lr`` (about 1e-5 in a full fine-tune)
is below half a bf16 ulp of most weights (2**-9 relative), so round-to-nearest throws it away and
the run barely trains. On bf16 weights :func:`build_adamw` therefore uses
:class:`StochasticRoundingAdamW`: the update is computed in fp32 and rounded up or down at random
with the probabilities that make the rounded weight equal the fp32 one on average, so no update is
lost in expectation, with no fp32 copy of the weights.

The moments are bf16 and rounded the same way. Rounded to nearest, ``exp_avg_sq`` could not decay:
with beta2 = 0.999 a step changes it by 0.1%, below half a bf16 ulp, so after the gradients shrink
it stays at the old scale and the steps shrink with it. Stochastic rounding decays it as fp32 does
on average, at 2 + 2 bytes per parameter (fp32 moments would take 8).
"""
import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from torchft.training import _cpu_adamw

_MASK16 = 0xFFFF
_MASK31 = 0x7FFFFFFF


def _hash31(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 31-bit value of each integer in ``x``.

    Every product is cut to its low 31 bits, which are the same whether the integers are 32 or 64 bits
    wide: compiled for a GPU, an index built by ``arange(..., dtype=int32)`` can come out 64 bits wide,
    and the noise must not depend on that.
    """
    x = x & _MASK31
    x = ((x >> 16) & _MASK16) ^ x
    x = (x * 0x45D9F3B) & _MASK31
    x = ((x >> 16) & _MASK16) ^ x
    x = (x * 0x45D9F3B) & _MASK31
    return ((x >> 16) & _MASK16) ^ x


def _noise_window(bits: torch.Tensor, i: int) -> torch.Tensor:
    """The ``i``-th (0, 1, 2) 16-bit window of the 31 hashed ``bits``: bits 0-15, 7-22 and 15-30, each
    uniform in [0, 2**16)."""
    return (bits >> (0, 7, 15)[i]) & _MASK16


def _round_to_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x`` [n] fp32 rounded stochastically to bf16 with ``noise`` [n] int32 uniform in [0, 2**16).

    Adding the noise to the 16 bits that bf16 drops carries into the kept bits with probability
    (dropped bits) / 2**16: rounded up that often, down otherwise, so the mean is ``x``.
    """
    # The noise goes through fp32 (exact below 2**24) to be int32 for certain: added to a 64-bit value,
    # the sum could not be reinterpreted as fp32 (the GPU compiler refuses that bitcast).
    noise = noise.float().to(torch.int32)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _noise_from_generator(p: torch.Tensor) -> bool:
    """Whether ``p``'s rounding noise comes from its device's random generator (GPUs) or the hash."""
    return p.is_cuda


def _adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, found_inf, seed, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """One AdamW update of the bf16 ``p``, ``exp_avg`` and ``exp_avg_sq`` (all [n], in place), rounded
    stochastically; ``step`` ([] fp32) counts it. Nothing changes where ``found_inf`` ([] 1.0) says so.

    The math is fp32 in registers: compiled, this is one loop over ``p`` with no temporaries. On the
    CPU the rounding noise is a hash of (element, step, ``seed``): no generator state to save, so a
    resumed run rounds exactly as the uninterrupted one; on a GPU it comes from the CUDA generator.
    """
    keep = found_inf > 0
    step.add_(1 - found_inf)  # the bias corrections use this step's count
    if _noise_from_generator(p):
        # On a GPU the noise comes from the device's generator, whose state a checkpoint saves with the
        # run's other RNG states (a resumed run draws the same noise): random bits compile there as
        # dropout's do, while the GPU compiler widened the hash's integers to 64 bits (torch 2.11).
        bits = torch.randint(0, 2**31, (p.numel(),), dtype=torch.int32, device=p.device)  # [n]
    else:
        key = step.to(torch.int32) * -1640531527 + seed  # [] a different noise pattern each step
        bits = _hash31(torch.arange(p.numel(), dtype=torch.int32, device=p.device) * 0x27D4EB2F + key)  # [n]
    g = grad.float()
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    denom = v.sqrt() / (1 - beta2**step).sqrt() + eps
    new_p = p.float() * (1 - lr * weight_decay) - lr / (1 - beta1**step) * m / denom
    # One hash, three 16-bit windows of it (each uniform; a second hash would double the cost)
    p.copy_(torch.where(keep, p, _round_to_bf16(new_p, _noise_window(bits, 0))))
    exp_avg.copy_(torch.where(keep, exp_avg, _round_to_bf16(m, _noise_window(bits, 1))))
    exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, _round_to_bf16(v, _noise_window(bits, 2))))


# Below this many elements a CPU update runs on one thread: with n unknown at compile time the loop
# would start the thread pool for any size, and on a busy CPU that wait dwarfs a small update.
_PARALLEL_NUMEL = 2**16


@functools.cache
def _compiled_adamw_update(parallel: bool):
    # Every tensor is flattened to [n] and n is symbolic: one compiled loop serves every weight
    # shape, rather than one compilation per shape.
    options = None if parallel else {"cpp.threads": 1}
    return torch.compile(_adamw_update, fullgraph=True, dynamic=True, options=options)


def _update_for(p: torch.Tensor, grad: torch.Tensor):
    # Eager on meta (tune estimate: nothing allocated) and under a dispatch mode (a tracker of the
    # ops: compiled code cannot run inside one). On the CPU a C loop (see _cpu_adamw) where it builds:
    # the compiled update rounds ~4x slower than torch's fused AdamW there.
    if p.device.type == "meta" or _get_current_dispatch_mode() is not None:
        return _adamw_update
    if (p.device.type == "cpu" and not _noise_from_generator(p) and grad.dtype is torch.bfloat16
            and _cpu_adamw.available()):
        return _cpu_adamw.sr_adamw_update
    return _compiled_adamw_update(p.is_cuda or p.numel() >= _PARALLEL_NUMEL)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), flattened to [n]; the update is elementwise.
    ``detach`` after ``view``: the result shares ``t``'s memory but is no view of it, so the compiled
    update does not guard on (and recompile for) the shape of what it was flattened from."""
    return (t.to_local() if hasattr(t, "to_local") else t).view(-1).detach()


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: fp32 math, weights and both moments stored in bf16 and rounded
    stochastically (6 bytes per parameter with the weight). Like torch's fused AdamW, it skips the
    update on the device when its ``found_inf`` attribute ([] 1.0) is set. The update is one C loop
    on the CPU (:mod:`torchft.training._cpu_adamw`; compiled where no C compiler is found), compiled on
    a GPU, eager on ``meta``. ``seed`` offsets the rounding noise (each weight of
    :class:`OptimizerInBackward` has its own optimizer and seed).

    State per parameter, as torch's AdamW: ``step`` ([] fp32), ``exp_avg``, ``exp_avg_sq`` (bf16).
    """

    skips_on_found_inf = True

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = seed
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype is not torch.bfloat16:
                    raise ValueError(f"optimizer.bf16_stochastic_round=true needs bf16 weights; a trainable "
                                     f"parameter of shape {list(p.shape)} is {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        skip = None  # [] per device: 1.0 skips the update
        index = 0
        for group in self.param_groups:
            if not isinstance(group["lr"], torch.Tensor):  # a scheduler or OptimizerInBackward sets a float
                group["lr"] = torch.tensor(group["lr"], dtype=torch.float32)
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self._state_of(p)
                if skip is None:
                    skip = found_inf if found_inf is not None else torch.zeros((), device=state["step"].device)
                flat = _local(p)
                seed = (self.seed * 1000003 + index) % 2**31  # an int32: the noise is computed in int32
                grad = _local(p.grad)
                _update_for(flat, grad)(flat, grad, _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                                  state["step"], group["lr"], skip, seed, group["betas"][0], group["betas"][1],
                                  group["eps"], group["weight_decay"])
        return None

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), device=p.device)  # on the device: found_inf decides
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif state["step"].device != p.device:  # loaded from a CPU checkpoint
            state["step"] = state["step"].to(p.device)
        return state


def build_adamw(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    bf16_stochastic_round: bool | None = None,
    decay_all_params: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params``.

    fp32 weights: torch's fused AdamW (one kernel per step).
    bf16 weights: :class:`StochasticRoundingAdamW` (weights and moments in bf16, math in fp32),
    unless ``bf16_stochastic_round=False`` (then torch's AdamW rounding to nearest, which loses small
    updates and cannot decay ``exp_avg_sq``).
    ``weight_decay`` applies to matrices only: 1-D parameters (norm weights, biases, DoRA magnitudes)
    are not pulled toward 0, unless ``decay_all_params=True``.
    """
    if lr <= 0:
        raise ValueError(f"optimizer.lr ({lr}) must be > 0")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to optimize")
    groups = weight_decay_groups(params, weight_decay, decay_all_params)
    if bf16_stochastic_round is None:
        bf16_stochastic_round = all(p.dtype is torch.bfloat16 for p in params)
    if bf16_stochastic_round:
        return StochasticRoundingAdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    # fused (on the CPU too): one kernel per step, and the update is skipped on the device when
    # ``found_inf`` is set (see step_unless_nonfinite). Meta parameters (``tune estimate``) have no
    # fused kernel; the unfused AdamW keeps the same states.
    fused = all(p.device.type != "meta" for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def weight_decay_groups(params: list[nn.Parameter], weight_decay: float, decay_all_params: bool) -> list[dict]:
    """Param groups: matrices with ``weight_decay``, 1-D parameters (norm weights, biases, DoRA
    magnitudes [out_dim]) with none, since pulling a scale or an offset toward 0 is not a
    regularisation; one group with ``weight_decay`` for all if ``decay_all_params``. Empty groups
    are left out."""
    if decay_all_params:
        return [{"params": params, "weight_decay": weight_decay}]
    matrices = [p for p in params if p.ndim >= 2]  # DTensor (FSDP2): ndim is the full tensor's
    vectors = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0})
            if g["params"]]


class OptimizerInBackward(torch.optim.Optimizer):
    """AdamW applied to each parameter as soon as its gradient is ready, then the gradient is freed.

    Full fine-tuning then never holds the gradients of the whole model at once (for a 1B model in
    bf16 that is 2.5 GB less peak memory). The price: no gradient accumulation and no clipping of
    the global norm, because the update happens before the other gradients exist.

    It is an ``Optimizer`` with one param group so that an LR scheduler drives it as usual: the
    hook copies the group's current ``lr`` into the per-parameter optimizer before each update.
    ``step()`` and ``zero_grad()`` are no-ops (the work happened in backward); ``state_dict()``
    holds every per-parameter optimizer's state, in parameter order, for exact resume.
    """

    def __init__(self, params: Iterable[nn.Parameter], **adamw_kwargs):
        params = [p for p in params if p.requires_grad]
        super().__init__(params, {"lr": adamw_kwargs["lr"]})
        self._optimizers = [build_adamw([p], **adamw_kwargs) for p in params]
        for index, opt in enumerate(self._optimizers):
            if isinstance(opt, StochasticRoundingAdamW):  # each weight its own rounding noise
                opt.seed = index
        self._grad_sq: torch.Tensor | None = None  # [] sum of squared gradients of this step so far
        self._found_inf: torch.Tensor | None = None  # [] 1.0 once a gradient of this step was not finite
        self._handles = []
        for param, opt in zip(params, self._optimizers):
            self._handles.append(param.register_post_accumulate_grad_hook(self._make_hook(opt)))

    def _make_hook(self, opt: torch.optim.Optimizer):
        def hook(param: nn.Parameter) -> None:
            sq = torch.linalg.vector_norm(param.grad, dtype=torch.float32).square()  # [] on the device
            found_inf = (~torch.isfinite(sq)).float()  # this weight's update is skipped when set
            self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
            self._found_inf = found_inf if self._found_inf is None else torch.maximum(self._found_inf, found_inf)
            opt.param_groups[0]["lr"] = self.param_groups[0]["lr"]
            step_unless_nonfinite(opt, found_inf)
            opt.zero_grad(set_to_none=True)

        return hook

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - updates already happened in backward
        return None

    def step_stats(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's gradient norm and non-finite flag (both [] on the device, from the hooks), then reset.
        A non-finite ``loss`` also sets the flag (its gradients, all NaN, were skipped already)."""
        grad_sq = self._grad_sq if self._grad_sq is not None else torch.zeros_like(loss, dtype=torch.float32)
        found_inf = self._found_inf if self._found_inf is not None else torch.zeros_like(grad_sq)
        self._grad_sq = self._found_inf = None
        return grad_sq.sqrt(), torch.maximum(found_inf, nonfinite_flag(loss, None))

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - gradients are freed by the hooks
        return None

    def state_dict(self) -> dict:
        return {"lr": self.param_groups[0]["lr"], "per_param": [opt.state_dict() for opt in self._optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        per_param = state_dict["per_param"]
        if len(per_param) != len(self._optimizers):
            raise ValueError(
                f"optimizer state has {len(per_param)} parameters, the model has {len(self._optimizers)} trainable"
            )
        self.param_groups[0]["lr"] = state_dict["lr"]
        for opt, sd in zip(self._optimizers, per_param):
            opt.load_state_dict(sd)

    def remove_hooks(self) -> None:
        """Detach from the parameters (the model then trains with an ordinary optimizer again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients ([] on the device), after clipping them to ``max_norm``
    (None: no clipping). Nothing is read back: a NaN norm is caught by :func:`nonfinite_flag`."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    return torch.nn.utils.clip_grad_norm_(with_grad, max_norm=float(max_norm))


def nonfinite_flag(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """[] float on the device: 1.0 when the loss or the gradient norm is NaN or infinite, else 0.0."""
    bad = ~torch.isfinite(loss.detach())
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
    return bad.float()


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()``, skipped when ``found_inf`` ([] float) is 1.0.

    torch's fused optimizers and the stochastic-rounding AdamW read ``found_inf`` as an attribute, as
    ``torch.amp.GradScaler`` passes it, and skip on the device. Any other optimizer gets the flag read
    back first (one host-device sync per step).
    """
    if optimizer.defaults.get("fused") or getattr(optimizer, "skips_on_found_inf", False):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif found_inf.device.type == "meta" or not found_inf.item():  # meta (tune estimate): no value to read
        optimizer.step()
