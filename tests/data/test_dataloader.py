"""The resumable loader: seeded order, exact resume mid-epoch, epochs, ranks."""
import pytest
import torch

from torchft.data import build_dataloader, padded_collate


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": [i, i + 1], "labels": [i, i + 1]}


def run(loader, epochs, stop_after=None):
    """Batches as a recipe sees them, optionally stopping (and saving state) after ``stop_after``."""
    seen = []
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            seen.append(batch["tokens"][:, 0].tolist())
            if stop_after is not None and len(seen) == stop_after:
                return seen, loader.state_dict()
    return seen, loader.state_dict()


@pytest.mark.parametrize("stop_after", [1, 4, 5, 7])
def test_resume_sees_exactly_the_batches_it_would_have_seen(stop_after):
    make = lambda: build_dataloader(Numbers(23), batch_size=4, collate_fn=padded_collate, seed=7)
    uninterrupted, _ = run(make(), epochs=3)
    assert len(uninterrupted) == 3 * 5  # 23 // 4 batches per epoch, last partial batch dropped
    first, state = run(make(), epochs=3, stop_after=stop_after)
    resumed = make()
    resumed.load_state_dict(state)
    rest, _ = run(resumed, epochs=3)
    assert first + rest == uninterrupted


def test_seeded_order_epochs_and_ranks():
    a, _ = run(build_dataloader(Numbers(16), 4, padded_collate, seed=1), epochs=2)
    b, _ = run(build_dataloader(Numbers(16), 4, padded_collate, seed=1), epochs=2)
    c, _ = run(build_dataloader(Numbers(16), 4, padded_collate, seed=2), epochs=2)
    assert a == b and a != c and a[:4] != a[4:]  # same seed, same order; each epoch reshuffles
    ordered, _ = run(build_dataloader(Numbers(16), 4, padded_collate, shuffle=False), epochs=1)
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    shards = [run(build_dataloader(Numbers(17), 2, padded_collate, seed=3, rank=r, world_size=2), epochs=1)[0]
              for r in range(2)]
    flat = [sorted(x for batch in shard for x in batch) for shard in shards]
    assert len(flat[0]) == len(flat[1]) == 8 and not set(flat[0]) & set(flat[1])


def test_keeping_the_last_samples_on_several_ranks_pads_them_with_masked_copies():
    """17 samples on 2 ranks: 9 each, the 18th a copy that carries no loss, so no sample is dropped."""
    shards = [[b for b in build_dataloader(Numbers(17), 4, padded_collate, shuffle=False, drop_last=False, rank=r,
                                           world_size=2)] for r in range(2)]
    tokens = [[x for b in shard for x in b["tokens"][:, 0].tolist()] for shard in shards]
    assert len(tokens[0]) == len(tokens[1]) == 9 and sorted(tokens[0] + tokens[1][:-1]) == list(range(17))
    assert tokens[1][-1] == 0  # the copy of sample 0 ...
    assert shards[1][-1]["num_target_tokens"] == 0  # ... whose labels are all masked
    assert sum(b["num_target_tokens"] for shard in shards for b in shard) == 17  # each real sample's one target


def test_state_mismatch_and_empty_loader_errors():
    loader = build_dataloader(Numbers(10), 2, padded_collate)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="saved batch_size=2 but this run has batch_size=3"):
        build_dataloader(Numbers(10), 3, padded_collate).load_state_dict(state)
    with pytest.raises(ValueError, match="gives no batch of batch_size=8"):
        build_dataloader(Numbers(5), 8, padded_collate)


def test_a_state_saved_at_an_epochs_last_batch_names_the_next_epochs_first():
    loader = build_dataloader(Numbers(16), 4, padded_collate, seed=5)  # 4 batches per epoch
    batches = iter(loader)
    for _ in range(4):
        next(batches)  # the epoch's last batch is in use: the next one to draw is epoch 1's first
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    expected = next(iter(loader))["tokens"]
    for saved in (state, {**state, "epoch": 0, "position": 4}):  # and (e, len), as older checkpoints saved it
        resumed = build_dataloader(Numbers(16), 4, padded_collate, seed=5)
        resumed.load_state_dict(saved)
        assert (resumed.epoch, resumed.position) == (1, 0)
        assert torch.equal(next(iter(resumed))["tokens"], expected)


@pytest.mark.parametrize("steps_done", [2, 4, 6])  # mid-epoch, the epoch's last step, the next epoch's
def test_optimizer_steps_resume_at_any_boundary(steps_done):
    from torchft.training.steps import step_micro_batches

    make = lambda: build_dataloader(Numbers(32), 4, padded_collate, seed=3)  # 8 batches: 4 steps of 2 per epoch
    ids = lambda step: [b["tokens"][:, 0].tolist() for b in step]
    uninterrupted = step_micro_batches(make(), 2)
    expected = [ids(next(uninterrupted)) for _ in range(10)]
    first = make()
    steps = step_micro_batches(first, 2)
    assert [ids(next(steps)) for _ in range(steps_done)] == expected[:steps_done]
    resumed = make()
    resumed.load_state_dict(first.state_dict())  # saved after step `steps_done`, as the training loop saves
    steps = step_micro_batches(resumed, 2)
    assert [ids(next(steps)) for _ in range(10 - steps_done)] == expected[steps_done:]
