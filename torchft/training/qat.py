"""Quantization-aware training (QAT): train through the rounding the quantized model will do.

A config's ``qat:`` section turns it on in any fine-tuning recipe (full or LoRA, one device or many)::

    qat:
      scheme: 8da4w                 # int8 dynamic per-token activations + int4 grouped weights
      group_size: 32                # weights per int4 scale; must divide every linear's input size
      fake_quant_after_n_steps: 0   # steps 1..N train without fake quantization, N+1.. with it

Schemes and the ``tune run quantize`` scheme that converts the saved folder:

* ``8da4w``: activations int8, asymmetric, one scale per token (computed on the fly); weights int4,
  symmetric, one scale per ``group_size`` inputs -> ``int8_dynamic_activation_int4_weight``;
* ``4w``: weights int4 (uint4 + float zero point, the tinygemm layout), one scale per group,
  activations untouched -> ``int4_weight_only`` (CUDA).

Fake quantization is torchao's (``IntxFakeQuantizeConfig`` / ``FakeQuantizerBase``): a quantize then
dequantize in the layer's dtype, with a straight-through gradient. Every linear of the decoder layers
gets it (``lm_head`` only with ``include_lm_head: true``; embeddings never): plain ``nn.Linear``
become torchao's ``FakeQuantizedLinear`` through ``quantize_(model, QATConfig(..., step="prepare"))``;
LoRA/frozen linears get the same quantizers attached and fake-quantize the weight the layer computes
with, ``W + (alpha / rank) * B @ A`` for LoRA: the merged weight that ``tune run quantize`` will
quantize. The parameters and their names do not change, so the step folders stay plain HF folders.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

# QAT scheme -> the ``tune run quantize`` scheme whose numerics it simulates
CONVERT_SCHEMES = {"8da4w": "int8_dynamic_activation_int4_weight", "4w": "int4_weight_only"}


@dataclass(frozen=True)
class QATSettings:
    """A config's ``qat:`` section (see the module docstring)."""

    scheme: str
    group_size: int = 32
    fake_quant_after_n_steps: int = 0
    include_lm_head: bool = False

    def __post_init__(self):
        if self.scheme not in CONVERT_SCHEMES:
            raise ValueError(f"qat.scheme '{self.scheme}' is not a QAT scheme; choose one of "
                             f"{', '.join(CONVERT_SCHEMES)}")
        if self.group_size <= 0:
            raise ValueError(f"qat.group_size ({self.group_size}) must be > 0")
        if self.fake_quant_after_n_steps < 0:
            raise ValueError(f"qat.fake_quant_after_n_steps ({self.fake_quant_after_n_steps}) must be >= 0")


def qat_settings(section: Mapping | None) -> QATSettings | None:
    """The settings of a config's ``qat:`` section; None when there is none (or it is null)."""
    if section is None:
        return None
    known = set(QATSettings.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"qat: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return QATSettings(**dict(section))


def fake_quantize_configs(scheme: str, group_size: int):
    """torchao's ``(activation_config, weight_config)`` for ``scheme`` (activation None for ``4w``).

    They mirror what torchao's convert step quantizes with: ``8da4w`` the configs
    ``QATConfig(Int8DynamicActivationIntxWeightConfig(...))`` infers, ``4w`` the tinygemm numerics
    (uint4 with a float zero point) of ``Int4WeightOnlyConfig``'s packed layout.
    """
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.quant_primitives import ZeroPointDomain

    if scheme == "8da4w":
        activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True)
        return activation, weight
    if scheme == "4w":
        weight = IntxFakeQuantizeConfig(torch.uint4, group_size=group_size, is_symmetric=False,
                                        scale_precision=torch.bfloat16, zero_point_precision=torch.bfloat16,
                                        zero_point_domain=ZeroPointDomain.FLOAT)
        return None, weight
    raise ValueError(f"qat.scheme '{scheme}' is not a QAT scheme; choose one of {', '.join(CONVERT_SCHEMES)}")


def _targets(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Module]]:
    """The linears QAT fake-quantizes: every nn.Linear / frozen (LoRA) linear but the adapters' own
    ``lora_a``/``lora_b`` (part of the merged weight) and, unless asked, ``lm_head``."""
    from torchft.modules.peft.frozen_linear import FrozenLinear

    adapter_parts = {id(m) for module in model.modules() if hasattr(module, "lora_a")
                     for m in (module.lora_a, module.lora_b)}
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, FrozenLinear)) or id(module) in adapter_parts:
            continue
        if name.split(".")[-1] == "lm_head" and not include_lm_head:
            continue
        found.append((name, module))
    return found


def apply_qat(model: nn.Module, settings: QATSettings) -> nn.Module:
    """Prepare ``model`` for QAT in place (on ``meta`` or loaded; before compile and FSDP) and return it.

    Fake quantization starts enabled; :func:`set_fake_quant` switches it.

    Raises:
        ValueError: a linear's input size that ``group_size`` does not divide, a quantized (NF4/int8)
            base, DoRA, or adapter dropout (the merged weight QAT quantizes assumes none).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizerBase, QATConfig

    from torchft.modules.peft.dora import DoRALinear
    from torchft.modules.peft.frozen_linear import FrozenLinear

    activation, weight = fake_quantize_configs(settings.scheme, settings.group_size)
    targets = _targets(model, settings.include_lm_head)
    for name, module in targets:
        in_features = module.in_features if isinstance(module, nn.Linear) else module.in_dim
        if in_features % settings.group_size:
            raise ValueError(f"qat.group_size ({settings.group_size}) must divide the input size of every "
                             f"fake-quantized linear; {name} has {in_features}")
        if isinstance(module, FrozenLinear):
            if module.base_format is not None:
                raise ValueError(f"qat needs plain base weights; {name} stores its base as "
                                 f"{module.base_format} (drop quantize_base / use a lora_* builder)")
            if isinstance(module, DoRALinear):
                raise ValueError(f"qat supports LoRA, not DoRA; {name} is a DoRA layer (set model.use_dora=false)")
            if getattr(module, "dropout_p", 0.0) > 0:
                raise ValueError(f"qat with LoRA needs lora_dropout 0; {name} has {module.dropout_p} "
                                 "(the fake-quantized weight is the merged one)")
    plain = {id(m) for _, m in targets if isinstance(m, nn.Linear)}
    # on ``meta`` torchao's swap makes fresh weights (trainable); keep each parameter's requires_grad
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
              filter_fn=lambda module, fqn: id(module) in plain)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])
    for _, module in targets:
        if isinstance(module, FrozenLinear):
            module.input_fake_quantizer = None if activation is None else FakeQuantizerBase.from_config(activation)
            module.weight_fake_quantizer = FakeQuantizerBase.from_config(weight)
    return model


def fake_quantizers(model: nn.Module) -> list[nn.Module]:
    """Every torchao fake quantizer in ``model``."""
    from torchao.quantization.qat import FakeQuantizerBase

    return [m for m in model.modules() if isinstance(m, FakeQuantizerBase)]


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every fake quantizer of ``model`` on or off (off: the layers compute as plain ones)."""
    for quantizer in fake_quantizers(model):
        quantizer.enabled = enabled


def fake_quant_enabled(step: int, fake_quant_after_n_steps: int) -> bool:
    """Whether optimizer step ``step`` (1-based) trains with fake quantization. A function of the step
    alone, so a resumed run (before or after the switch) trains as the uninterrupted one."""
    return step > fake_quant_after_n_steps


def with_fake_quant_schedule(train_step, model: nn.Module, settings: QATSettings | None, *, start_step: int):
    """``train_step`` switching fake quantization on at step ``fake_quant_after_n_steps + 1``; sets the
    state for the steps after ``start_step`` now (validation before the first step sees it too).
    Without ``settings`` it returns ``train_step`` unchanged."""
    if settings is None:
        return train_step
    after = settings.fake_quant_after_n_steps
    set_fake_quant(model, fake_quant_enabled(start_step + 1, after))

    def step_with_schedule(micro_batches, step: int):
        if step == after + 1:
            set_fake_quant(model, True)
        return train_step(micro_batches, step)

    return step_with_schedule
