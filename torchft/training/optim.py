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


@functools.cache
def _stochastic_rounding_adamw():
    """torchao's AdamW (imported on first use: torchao is slow to import), stepping eagerly on the CPU
    (its compiled per-parameter step costs seconds of compilation there for no gain)."""
    import torchao.optim
    from torchao.optim.adam import single_param_adam

    # torchao 0.18 names its full-precision AdamW ``_AdamW`` (the low-bit ones are the public names)
    AdamW = getattr(torchao.optim, "AdamW", None) or torchao.optim._AdamW

    class StochasticRoundingAdamW(AdamW):
        """torchao AdamW with bf16 stochastic rounding whose ``lr`` may also be set as a float."""

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):  # OptimizerInBackward copies a float in
                    group["lr"] = torch.tensor(group["lr"], dtype=torch.float32)
            if all(p.is_cuda for group in self.param_groups for p in group["params"]):
                return super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    single_param_adam(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"],
                                      None, group["lr"], group["betas"][0], group["betas"][1],
                                      group["weight_decay"], group["eps"], True,
                                      self.bf16_stochastic_round and p.dtype is torch.bfloat16)
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

    fp32 weights: torch's AdamW, the fused kernel (one launch per step) when they are on a GPU.
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
    fused = all(p.is_cuda for p in params)
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
        self._handles = []
        for param, opt in zip(params, self._optimizers):
            self._handles.append(param.register_post_accumulate_grad_hook(self._make_hook(opt)))

    def _make_hook(self, opt: torch.optim.Optimizer):
        def hook(param: nn.Parameter) -> None:
            opt.param_groups[0]["lr"] = self.param_groups[0]["lr"]
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - updates already happened in backward
        return None

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


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the global L2 norm of the gradients to ``max_norm`` (None: no clipping) and return the norm."""
    if max_norm is None:
        return None
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.clip_grad_norm_(grads, max_norm=float(max_norm))
