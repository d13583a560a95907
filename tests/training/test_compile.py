"""Compiled decoder layers: one graph per layer (no graph break, with and without activation
checkpointing), the same values and gradients as eager, and no more kept for backward."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from torchft.training.activations import apply_activation_checkpointing
from torchft.training.compile import compile_layers

# One decoder layer whose every linear satisfies NF4's size rule (numel % 16384 == 0).
TINY = dict(vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=4, embed_dim=128, intermediate_dim=256,
            max_seq_len=32)


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(method: str):
    from torchft.models import llama
    from torchft.modules.peft import get_adapter_params, initialize_adapters, load_base_state_dict, set_trainable_params

    torch.manual_seed(0)
    if method == "full":
        return llama(**TINY)
    base_state = llama(**TINY).state_dict()
    with torch.device("meta"):
        model = llama(**TINY, lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True,
                      lora_rank=8, quantize_base=method == "qlora")
    load_base_state_dict(model, base_state, assign=True)
    initialize_adapters(model, device="cpu")
    set_trainable_params(model, get_adapter_params(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.02)  # non-zero adapters: every adapter gradient is non-trivial
    return model


def _run(model, tokens):
    """Logits [b, s, vocab], the trainable parameters' gradients of one forward and backward, and how
    many [b, s, intermediate] storages autograd kept."""
    kept = set()

    def pack(t):
        if type(t) is torch.Tensor and t.shape == (*tokens.shape, TINY["intermediate_dim"]):
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(kept)


# full fine-tuning without checkpointing takes the same path as LoRA's base linears (one compile per case)
@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("qlora", False), ("full", True)])
def test_compiled_layer_is_one_graph_and_equals_eager(method, checkpointing):
    """Compiled layers run as one graph each, keep only the gate and up projections of the MLP
    (the SwiGLU product is recomputed in backward; with checkpointing, nothing), and equal eager."""
    eager = _model(method)
    if checkpointing:
        apply_activation_checkpointing(eager)
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 1
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    logits, grads, kept = _run(compiled, tokens)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert kept == (0 if checkpointing else 2)
    ref_logits, ref_grads, ref_kept = _run(eager, tokens)
    assert ref_kept == kept
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_offload_hooks_run_eagerly_beside_compiled_layers():
    """Autograd calls the offloading hooks while a compiled layer runs; the compiler must leave them
    alone (traced, their stream calls cannot be compiled on CUDA), so the layer stays one graph."""
    from torchft.training.activations import OffloadActivations

    model = _model("lora")
    apply_activation_checkpointing(model)
    assert compile_layers(model) == 1
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    offload = OffloadActivations("cpu", min_bytes=1)
    with offload:
        logits = model(tokens)
    assert offload.offloaded_bytes > 0  # the checkpointed layer's input went through the hooks
    logits.square().mean().backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
