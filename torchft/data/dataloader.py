"""A seeded, resumable data loader: a resumed run sees exactly the batches it would have seen.

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``seed + e``, so the whole
random state is (seed, epoch); ``(epoch, position)`` names the next batch to draw. Handing out an epoch's
last batch moves it to ``(epoch + 1, 0)`` at once, so a state saved while that batch is in use resumes
at the next epoch's first batch (a state ``(e, len)`` of an older checkpoint is read the same way).
``state_dict()`` saves these; ``load_state_dict()`` restores them and the next iteration continues at
that batch. With several ranks, each takes every ``world_size``-th sample of the permutation.

    loader = build_dataloader(dataset, batch_size=4, collate_fn=..., seed=0)
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
            state = loader.state_dict()
"""
from __future__ import annotations

import functools

import torch

from torchft.data.collate import IGNORE_INDEX, packed_collate, padded_collate


class ResumableDataLoader:
    """Batches of ``dataset`` in a seeded order, with ``state_dict`` / ``load_state_dict`` / ``set_epoch``."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        collate_fn,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch = 0
        self.position = 0  # the next batch to draw is batch ``position`` of ``epoch`` (always < len(self))
        if len(self) == 0:
            raise ValueError(
                f"dataset of {len(dataset)} samples gives no batch of batch_size={batch_size} on "
                f"{world_size} rank(s) with drop_last={drop_last}"
            )

    def _indices(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        # Every rank gets the same number of samples: drop the tail that does not divide evenly.
        per_rank = n // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def _batches(self, epoch: int) -> list[list[int]]:
        indices = self._indices(epoch)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        per_rank = len(self.dataset) // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its first batch); the current epoch keeps its position (resume)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _roll_if_exhausted(self) -> None:
        """An epoch with no batch left to draw means the next epoch's first batch."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self):
        """The batches of the current epoch from ``position`` on (what is left of it after a resume)."""
        batches = self._batches(self.epoch)[self.position :]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: starting an iterator draws a worker seed, and drawing it from the
            # global RNG would shift dropout masks after a resume (which starts at another step).
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
        )
        for batch in loader:
            # Counted when handed out: a state saved while this batch is in use resumes after it, which
            # after an epoch's last batch is the next epoch's first (rolled here, before the yield: the
            # training loop saves while it holds this batch, before this loop would end).
            self.position += 1
            self._roll_if_exhausted()
            yield batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, current in (("batch_size", self.batch_size), ("world_size", self.world_size),
                             ("num_samples", len(self.dataset))):
            if state[key] != current:
                raise ValueError(
                    f"cannot resume the data order: saved {key}={state[key]} but this run has {key}={current}"
                )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._roll_if_exhausted()  # older checkpoints saved an exhausted epoch as (e, len)


class MaskedTailPadding(torch.utils.data.Dataset):
    """``dataset`` followed by copies of its first samples with every label masked, up to a multiple of
    ``multiple`` samples: that many ranks then share every sample evenly, and the copies carry no loss."""

    def __init__(self, dataset, multiple: int):
        self.dataset = dataset
        self.packed = getattr(dataset, "packed", False)
        self.num_samples = -(-len(dataset) // multiple) * multiple

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if i < len(self.dataset):
            return self.dataset[i]
        sample = dict(self.dataset[i % len(self.dataset)])
        for key in [k for k in sample if k.endswith("labels")]:  # "labels"; a pair's "chosen_labels" etc.
            labels = sample[key]  # a list (unpacked samples) or a [s] tensor (packs)
            sample[key] = (torch.full_like(labels, IGNORE_INDEX) if isinstance(labels, torch.Tensor)
                           else [IGNORE_INDEX] * len(labels))
        return sample


def build_dataloader(
    dataset,
    batch_size: int,
    collate_fn=None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    *,
    pad_id: int = 0,
    device=None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader`. Without ``collate_fn`` the collate matches the dataset:
    :func:`packed_collate` (mask built for ``device``) for packed datasets, else :func:`padded_collate`
    with ``pad_id`` (pass ``tokenizer.pad_id``).

    With ``drop_last=False`` on several ranks every sample is kept: the dataset is padded to a multiple
    of ``world_size`` with masked copies (:class:`MaskedTailPadding`), so a token-weighted loss over all
    ranks (validation) equals the loss one device computes."""
    if not drop_last and world_size > 1:
        dataset = MaskedTailPadding(dataset, world_size)
    if collate_fn is None:
        if getattr(dataset, "packed", False):
            collate_fn = functools.partial(packed_collate, device=device if num_workers == 0 else None)
        else:
            collate_fn = functools.partial(padded_collate, pad_id=pad_id)
    return ResumableDataLoader(
        dataset, batch_size, collate_fn, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
        world_size=world_size, num_workers=num_workers, pin_memory=pin_memory,
    )
