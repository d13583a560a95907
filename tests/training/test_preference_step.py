"""The references of preference tuning and the masked pairs of a padded tail (torchft.training.preference)."""
import pytest
import torch

from torchft.data.preference import preference_collate
from torchft.models._llama import llama
from torchft.modules.preference import PreferenceLoss
from torchft.training.optim import build_adamw
from torchft.training.preference import adapters_disabled_reference, frozen_reference, preference_step

DIMS = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            max_seq_len=64)
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4)


def _pair(seed: int, masked: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 64, (3,), generator=g).tolist()
    pair = {}
    for side, n in (("chosen", 4), ("rejected", 5)):
        answer = torch.randint(0, 64, (n,), generator=g).tolist()
        pair[f"{side}_tokens"] = prompt + answer
        pair[f"{side}_labels"] = [-100] * (3 + n) if masked else [-100] * 3 + answer
    return pair


def _policy_and_base():
    torch.manual_seed(0)
    policy = llama(**DIMS, **LORA)
    for name, p in policy.named_parameters():  # trained adapters: the policy differs from its base
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.1)
    base = llama(**DIMS)
    missing = base.load_state_dict({k: v for k, v in policy.state_dict().items() if "lora_" not in k}, strict=True)
    assert not missing.unexpected_keys
    return policy, base


def test_a_frozen_copy_of_the_base_equals_the_adapters_disabled_reference():
    policy, base = _policy_and_base()
    loss_fn = PreferenceLoss(chunk_tokens=5)
    batch = preference_collate([_pair(0), _pair(1)])
    disabled = adapters_disabled_reference(policy, loss_fn)(batch)  # [4]
    frozen = frozen_reference(base, loss_fn, batch)
    assert torch.allclose(disabled, frozen, atol=1e-6)
    assert not torch.allclose(frozen_reference(policy, loss_fn, batch), frozen, atol=1e-3)  # adapters on: differs


@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_a_masked_tail_pair_counts_nothing_in_the_loss_metrics_or_gradients(loss_type):
    """A rank's padded tail (a masked copy of a pair) changes neither the step's metrics nor its update."""
    steps = []
    for pairs in ([_pair(0), _pair(1)], [_pair(0), _pair(1), _pair(0, masked=True)]):
        policy, _ = _policy_and_base()
        for name, p in policy.named_parameters():
            p.requires_grad_("lora_" in name)
        loss_fn = PreferenceLoss(loss_type=loss_type, chunk_tokens=7)
        batch = preference_collate(pairs)
        optimizer = build_adamw([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        result = preference_step(policy, [batch], loss_fn, optimizer, scheduler,
                                 reference=adapters_disabled_reference(policy, loss_fn))
        steps.append((batch["num_pairs"], result, {k: v.detach().clone() for k, v in policy.state_dict().items()}))
    (pairs, plain, weights), (padded_pairs, padded, padded_weights) = steps
    assert pairs == padded_pairs == 2
    assert float(padded.loss) == pytest.approx(float(plain.loss), abs=1e-6)
    for name in plain.metrics:
        assert float(padded.metrics[name]) == pytest.approx(float(plain.metrics[name]), abs=1e-6)
    assert all(torch.allclose(weights[k], padded_weights[k], atol=1e-6) for k in weights)


def test_precomputed_reference_tables_look_up_what_the_reference_gives_each_batch():
    """The LoRA reference (adapters disabled) run once over a dataset, then looked up by the pairs' indices in
    any order and batch; a rank's masked tail copy (MaskedTailPadding) neither fills nor overwrites a row."""
    from torchft.data.dataloader import MaskedTailPadding, build_dataloader
    from torchft.training.preference import precompute_reference

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"index": i, **_pair(i)}

    policy, _ = _policy_and_base()
    loss_fn = PreferenceLoss(chunk_tokens=5)
    reference = adapters_disabled_reference(policy, loss_fn)
    loader = build_dataloader(MaskedTailPadding(Pairs(), 3), 2, collate_fn=preference_collate, shuffle=False)
    table = precompute_reference(reference, loader, torch.device("cpu"))
    batch = preference_collate([Pairs()[i] for i in (4, 0, 3)])  # another order and batch size; 0 was copied
    assert torch.allclose(table(batch), reference(batch), atol=1e-5)
    assert not torch.allclose(table(batch), frozen_reference(policy, loss_fn, batch), atol=1e-3)  # adapters on
