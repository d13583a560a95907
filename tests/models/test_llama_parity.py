"""The torchft Llama matches transformers' LlamaForCausalLM on tiny random weights (fp32, CPU)."""
import pytest
import torch

from tests.models._hf_reference import VARIANTS, hf_to_torchft_keys, tiny_hf_llama
from torchft.models import from_hf_config


def _torchft_twin(hf_model):
    model = from_hf_config(hf_model.config.to_dict()).eval()
    missing, unexpected = model.load_state_dict(hf_to_torchft_keys(hf_model.state_dict(), tied=hf_model.config.tie_word_embeddings), strict=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in model.parameters()) == model.args.num_params()
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    hf = tiny_hf_llama(variant)
    ours = _torchft_twin(hf)
    tokens = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 48, 128)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=0)


def test_explicit_positions_and_mask_equal_default_causal():
    """Passing the causal mask and positions 0..s-1 explicitly changes nothing."""
    ours = _torchft_twin(tiny_hf_llama("llama3"))
    tokens = torch.randint(0, 128, (2, 16))
    causal = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 16, 16)
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, mask=causal, input_pos=positions), ours(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["llama3", "llama3_2"])
def test_kv_cache_decoding_matches_full_forward(variant):
    ours = _torchft_twin(tiny_hf_llama(variant))
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_caches(batch_size=2, dtype=torch.float32, max_seq_len=32)
        prefix = ours(tokens[:, :12])  # prefill 12 tokens
        steps = [ours(tokens[:, i:i + 1]) for i in range(12, 20)]  # then one at a time
    incremental = torch.cat([prefix, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)
    assert ours.caches_are_enabled()
    ours.reset_caches()
    with torch.no_grad():  # after a reset the cache starts again from position 0
        torch.testing.assert_close(ours(tokens[:, :12]), prefix, atol=1e-6, rtol=0)
    ours.clear_caches()
    assert not ours.caches_are_enabled()


def test_kv_cache_overflow_is_a_clear_error():
    ours = _torchft_twin(tiny_hf_llama("llama3"))
    ours.setup_caches(batch_size=1, dtype=torch.float32, max_seq_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"KV cache holds 8 positions; 6 are filled and 4 more"):
        ours(torch.zeros(1, 6, dtype=torch.long))
        ours(torch.zeros(1, 4, dtype=torch.long))


def test_bf16_forward_close_to_transformers():
    hf = tiny_hf_llama("llama3_2").to(torch.bfloat16)
    ours = _torchft_twin(hf).to(torch.bfloat16)
    tokens = torch.randint(0, 128, (1, 32))
    with torch.no_grad():
        expected, got = hf(tokens).logits.float(), ours(tokens).float()
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
