"""Optimizers: AdamW (fused on CUDA; stochastic rounding on bf16 weights), optimizer-in-backward, clipping.

bf16 weights cannot take small updates: an AdamW step of ``lr`` (about 1e-5 in a full fine-tune)
is below half a bf16 ulp of most weights (2**-9 relative), so round-to-nearest throws it away and
the run barely trains. On bf16 weights :func:`build_adamw` therefore uses torchao's AdamW with
``bf16_stochastic_round=True``: the update is computed in fp32 and rounded up or down at random with
the probabilities that make the rounded weight equal the fp32 one on average, so no update is lost
in expectation, with no fp32 copy of the weights (benchmarks/RESULTS.md compares it with fp32 master
weights: same learning, half the optimizer memory).
"""
import functools
from collections.abc import Iterable

import torch
from torch import nn


def _adamw_update(p, grad, step, exp_avg, exp_avg_sq, lr, beta1: float, beta2: float, weight_decay: float,
                  eps: float, found_inf):
    """One AdamW update of ``p`` (bf16: stochastically rounded), left undone where ``found_inf`` ([] 1.0) says so.

    torchao's ``single_param_adam`` does the math (in fp32) on copies; ``torch.where`` keeps the old
    weight and moments when the step is not finite, on the device (compiled, the copies fuse away).
    """
    from torchao.optim.adam import single_param_adam

    new_p, new_avg, new_avg_sq = p.clone(), exp_avg.clone(), exp_avg_sq.clone()
    single_param_adam(new_p, grad, step, new_avg, new_avg_sq, None, lr, beta1, beta2, weight_decay, eps, True,
                      p.dtype is torch.bfloat16)
    keep = found_inf > 0
    p.copy_(torch.where(keep, p, new_p))
    exp_avg.copy_(torch.where(keep, exp_avg, new_avg))
    exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, new_avg_sq))


@functools.cache
def _compiled_adamw_update():
    return torch.compile(_adamw_update, fullgraph=True, dynamic=False)


@functools.cache
def _stochastic_rounding_adamw():
    """torchao's AdamW (imported on first use: torchao is slow to import) with the found-inf skip."""
    import torchao.optim

    # torchao 0.18 names its full-precision AdamW ``_AdamW`` (the low-bit ones are the public names)
    AdamW = getattr(torchao.optim, "AdamW", None) or torchao.optim._AdamW

    class StochasticRoundingAdamW(AdamW):
        """torchao's AdamW with bf16 stochastic rounding that, like torch's fused AdamW, skips the
        update on the device when its ``found_inf`` attribute ([] 1.0) is set, and whose ``lr`` may be
        set as a float. The update is compiled on GPUs and eager on the CPU (compiling it there costs
        seconds for no gain on the small models trained on a CPU)."""

        skips_on_found_inf = True

        @torch.no_grad()
        def step(self, closure=None):
            found_inf = getattr(self, "found_inf", None)
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):  # OptimizerInBackward copies a float in
                    group["lr"] = torch.tensor(group["lr"], dtype=torch.float32)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), device=p.device)  # on the device: found_inf decides
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    elif state["step"].device != p.device:  # loaded from a CPU checkpoint
                        state["step"] = state["step"].to(p.device)
                    skip = found_inf if found_inf is not None else torch.zeros((), device=p.device)
                    state["step"] += 1 - skip
                    update = _compiled_adamw_update() if p.is_cuda else _adamw_update
                    with torch._dynamo.utils.disable_cache_limit():  # one compilation per weight shape
                        update(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"],
                               group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                               group["eps"], skip)
            return None

    return StochasticRoundingAdamW


def build_adamw(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    bf16_stochastic_round: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params``.

    fp32 weights: torch's fused AdamW (one kernel per step).
    bf16 weights: torchao's AdamW with stochastic rounding (states in bf16, math in fp32), unless
    ``bf16_stochastic_round=False`` (then torch's AdamW rounding to nearest, which loses small updates).
    """
    if lr <= 0:
        raise ValueError(f"optimizer.lr ({lr}) must be > 0")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to optimize")
    if bf16_stochastic_round is None:
        bf16_stochastic_round = all(p.dtype is torch.bfloat16 for p in params)
    if bf16_stochastic_round:
        return _stochastic_rounding_adamw()(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                                            bf16_stochastic_round=True)
    # fused (on the CPU too): one kernel per step, and the update is skipped on the device when
    # ``found_inf`` is set (see step_unless_nonfinite). Meta parameters (``tune estimate``) have no
    # fused kernel; the unfused AdamW keeps the same states.
    fused = all(p.device.type != "meta" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused)


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
