"""Makes the three builders of a preset: the plain model, its ``lora_`` twin and its ``qlora_`` twin."""
from typing import Any, Callable, Sequence, Union

from torchft.models._llama import llama
from torchft.modules.transformer import TransformerDecoder


def preset_builders(name: str, dims: dict[str, Any], summary: str, module: str) -> tuple[Callable, ...]:
    """Returns ``(name, lora_<name>, qlora_<name>)`` builders over the fixed ``dims``.

    They are real functions with their own signatures and docstrings, so ``tune validate`` can bind
    config arguments to them and ``help()`` shows what they take.
    """

    def base() -> TransformerDecoder:
        return llama(**dims)

    def lora(
        lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: Union[bool, str] = False,
    ) -> TransformerDecoder:
        return llama(**dims, lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
                     apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
                     lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base)

    def qlora(
        lora_attn_modules: Sequence[str] = ("q_proj", "v_proj"),
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: Union[bool, str] = "nf4",
    ) -> TransformerDecoder:
        return lora(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
                    lora_dropout, use_dora, quantize_base=quantize_base)

    adapter_doc = (
        "\n\n    Args:\n"
        "        lora_attn_modules: attention projections that get adapters (subset of q_proj k_proj v_proj o_proj).\n"
        "        apply_lora_to_mlp: adapters on gate_proj, up_proj and down_proj too.\n"
        "        apply_lora_to_output: an adapter on lm_head (not with tied embeddings).\n"
        "        lora_rank, lora_alpha, lora_dropout: adapter rank r, scale alpha (update scaled by alpha/r), dropout.\n"
        "        use_dora: DoRA (weight-decomposed) adapters instead of LoRA.\n"
        "        quantize_base: storage of the frozen weights: false (lora_ default), 'nf4' (qlora_ default, QLoRA)\n"
        "            or 'int8' (per-channel int8 weight-only).\n"
    )
    for fn, prefix, what in ((base, "", ""), (lora, "lora_", " with LoRA adapters"),
                             (qlora, "qlora_", " with LoRA adapters over quantized frozen weights (NF4 by default: QLoRA)")):
        fn.__name__ = fn.__qualname__ = prefix + name
        fn.__module__ = module
        fn.__doc__ = f"{summary}{what}." + (adapter_doc if prefix else "")
    return base, lora, qlora
