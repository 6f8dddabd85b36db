"""What every image datamodule of lit-prune shares: constructor arguments, loaders, shape metadata.

Each datamodule knows ``num_classes`` and ``input_size`` (C, H, W) right after ``__init__``, before any
data is read, because LightningCLI links ``data.num_classes`` to the model's constructor and the FLOPs
counter needs the input size before the first batch exists.

Speed (design.md): the classic pipeline decodes and augments one image at a time on the CPU. A GPU fast
path for the small datasets (whole split on the device, batched crop/flip on tensors, normalisation in
``on_after_batch_transfer``) can be added as a subclass or an option of a datamodule without changing
the model or the callbacks: everything outside sees only ``(images, labels)`` batches, ``num_classes``,
``input_size``, and the ``mean``/``std`` that each module exposes for that purpose.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochSeededRandomSampler(RandomSampler):
    """A random order of the dataset that depends only on a seed and the epoch number.

    torch's ``RandomSampler`` draws a new seed from the global RNG at every epoch. A checkpoint does not
    hold that RNG's state, so a run resumed at an epoch boundary would see other batches than the
    uninterrupted run. Here the seed is drawn once, when the loader is built (so ``seed_everything``
    decides it, and a restarted run, which builds its loader at the same point of the same seeded
    program, draws the same one), and epoch ``e`` uses the ``e``-th number of that seed's stream.
    Lightning calls ``set_epoch`` at the start of every training epoch (as for a ``DistributedSampler``,
    which replaces this sampler under DDP); used on its own, each iteration moves to the next epoch.

    Args:
        data_source: the dataset.
        seed: base seed; None draws one from torch's global RNG.
    """

    def __init__(self, data_source: Dataset, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(torch.randint(2**62, ())) if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        stream = torch.Generator().manual_seed(self.seed)
        epoch_seed = int(torch.randint(2**62, (epoch + 1,), generator=stream)[-1])
        order = torch.randperm(len(self.data_source), generator=torch.Generator().manual_seed(epoch_seed))
        return iter(order.tolist())


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base class: stores and checks the loader arguments and builds the three loaders.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup`` and define
    ``num_classes``, ``input_size``, ``mean`` and ``std``.

    Args:
        root: directory holding the dataset (its layout is documented by each subclass).
        batch_size: images per batch on each device.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster copies to the GPU; only used when CUDA is available.
    """

    def __init__(self, root: str, batch_size: int, num_workers: int = 4, pin_memory: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = load in the main process), got {num_workers}")
        self.root = str(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output width)."""
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image as the model receives it."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.train_set, "train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_set, "validation"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_set, "test"), shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # drop_last=False everywhere: the reference scripts keep the last partial training batch.
        kwargs: dict[str, Any] = {}
        if shuffle:
            # Not shuffle=True: an order fixed by (seed, epoch) lets a resumed run see the same batches. No
            # `shuffle` keyword either: Lightning then recognises a RandomSampler and shuffles under DDP.
            kwargs["sampler"] = EpochSeededRandomSampler(dataset)
        if self.num_workers > 0:
            # Workers survive between epochs: respawning them each epoch costs seconds on ImageNet.
            kwargs["persistent_workers"] = True
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            **kwargs,
        )

    @staticmethod
    def _require(dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(
                f"the {split} dataset is not loaded: call datamodule.setup() first "
                "(the Trainer does this for you)"
            )
        return dataset
