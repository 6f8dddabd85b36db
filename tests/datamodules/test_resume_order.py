"""The training order of every datamodule depends only on the seed and the epoch, so that a run resumed at an
epoch boundary sees the batches of the uninterrupted run (tests/protocol/test_run.py checks that end to end)."""

from __future__ import annotations

import torch
from pytorch_lightning.utilities.data import _is_dataloader_shuffled
from torch.utils.data import TensorDataset

from lit_prune.datamodules.base import EpochSeededRandomSampler, ImageClassificationDataModule


class _Tiny(ImageClassificationDataModule):
    def __init__(self) -> None:
        super().__init__("unused", batch_size=5, num_workers=0)
        self.train_set = TensorDataset(torch.arange(20))
        self.val_set = self.test_set = self.train_set


def _order(loader) -> list[int]:
    return torch.cat([b[0] for b in loader]).tolist()


def test_order_depends_on_seed_and_epoch_only() -> None:
    torch.manual_seed(0)
    first = _Tiny().train_dataloader()
    seen = []
    for epoch in range(4):
        first.sampler.set_epoch(epoch)
        seen.append(_order(first))
    assert all(sorted(o) == list(range(20)) for o in seen)
    assert len({tuple(o) for o in seen}) == 4  # a new order every epoch

    # a restarted process: same seeded program, a new loader, Lightning sets the epoch it resumes at
    torch.manual_seed(0)
    restarted = _Tiny().train_dataloader()
    torch.randn(100)  # whatever the restart draws after building the loader does not matter
    restarted.sampler.set_epoch(2)
    assert _order(restarted) == seen[2]
    assert _order(restarted) == seen[3]  # without set_epoch, the next iteration is the next epoch

    torch.manual_seed(1)
    other = _Tiny().train_dataloader()
    other.sampler.set_epoch(0)
    assert _order(other) != seen[0]


def test_explicit_seed_and_lightning_sees_a_shuffled_loader() -> None:
    data = TensorDataset(torch.arange(50))
    a, b = EpochSeededRandomSampler(data, seed=7), EpochSeededRandomSampler(data, seed=7)
    b.set_epoch(0)
    assert list(a) == list(b) != list(range(50))
    dm = _Tiny()
    # Lightning swaps in a shuffling DistributedSampler under DDP only for loaders it sees as shuffled
    assert _is_dataloader_shuffled(dm.train_dataloader())
    assert not _is_dataloader_shuffled(dm.val_dataloader())
    assert _order(dm.val_dataloader()) == list(range(20))
