"""What every image datamodule of lit-prune shares: constructor arguments, loaders, shape metadata.

Each datamodule knows ``num_classes`` and ``input_size`` (C, H, W) right after ``__init__``, before any
data is read, because LightningCLI links ``data.num_classes`` to the model's constructor and the FLOPs
counter needs the input size before the first batch exists.

Speed (design.md, issue 12): the classic pipeline decodes and augments one image at a time on the CPU.
``device: true`` (CIFAR, MNIST-5k; ImageNet refuses it) is the device-resident path instead:

* **Where the data lives.** ``setup`` reads the split as usual; the first loader built for it keeps the whole
  split once as a uint8 tensor (N, C, H, W) plus its int64 labels. On the first batch that copy is moved to
  the training device (``trainer.strategy.root_device``, CPU without a Trainer) and kept there.
* **How a batch is formed.** The loader is a plain ``DataLoader`` over the *indices* ``0..N-1`` with the same
  sampler as the classic path; its ``collate_fn`` (:class:`ResidentBatches`) turns the list of indices into
  the batch on the device: index the resident tensor, draw a crop offset and a flip per image there, crop
  and flip with one gather (:func:`crop_flip`), then ``/255``, ``- mean``, ``/ std`` exactly as ``ToTensor``
  and ``Normalize`` do. Batches come out of the loader already on the device, so Lightning's
  ``transfer_batch_to_device`` has nothing to move, and any code that iterates the loader itself (the
  reconstruction methods, ``lit_prune.cli.prune``) gets ordinary ``(images, labels)`` batches.
* **Order, shards, resume.** The sampler is the classic path's :class:`EpochSeededRandomSampler`, so the
  epoch order is the same function of (seed, epoch); under DDP Lightning swaps in its ``DistributedSampler``
  for this loader exactly as for the classic one, so each rank reads the same shard. The crop/flip draws of
  an epoch come from a generator seeded by (sampler seed, epoch, rank) at the start of the epoch's
  iteration (:class:`ResidentLoader`), so a run resumed at an epoch boundary sees the same augmented
  batches too (the classic path draws them from the global RNG).

Everything outside sees only ``(images, labels)`` batches, ``num_classes``, ``input_size`` and the
``mean``/``std`` of each module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
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


# ---- the device-resident path ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceAugmentation:
    """What the device path draws per training image: a crop after zero padding, and a horizontal flip.

    Args:
        padding: zero padding on each side before a random crop of the original size (0: no crop).
        flip: flip horizontally with probability 1/2.
    """

    padding: int = 0
    flip: bool = False


def draw_crop_flip(
    num: int, aug: DeviceAugmentation, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(top, left, flip)``: offsets uniform in ``[0, 2 * padding]`` (torchvision's ``RandomCrop``
    on the padded image), flips with probability 1/2; drawn on ``device`` from ``generator``."""
    high = 2 * aug.padding + 1
    top = torch.randint(0, high, (num,), generator=generator, device=device)
    left = torch.randint(0, high, (num,), generator=generator, device=device)
    if aug.flip:
        flip = torch.randint(0, 2, (num,), generator=generator, device=device).bool()
    else:
        flip = torch.zeros(num, dtype=torch.bool, device=device)
    return top, left, flip


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Zero-pad each image by ``padding``, crop ``H x W`` at ``(top, left)`` of the padded image, flip where
    ``flip``: torchvision's ``F.pad(img, padding)``, ``F.crop(img, top, left, H, W)``, ``F.hflip`` per image.

    A zero pad of the batch, then one gather: output pixel (i, j) of image b reads the padded image at row
    ``top[b] + i`` and column ``left[b] + j``, or ``left[b] + W - 1 - j`` where ``flip[b]`` (the flip is a
    ``torch.where`` on the column index, so flipped and unflipped images cost the same). On this CPU that is
    twice as fast as gathering from the unpadded batch with a mask for the border.

    Args:
        images: (B, C, H, W), any dtype (uint8 on the device path).
        top, left: (B,) int offsets in ``[0, 2 * padding]``.
        flip: (B,) bool.
        padding: the zero padding.

    Returns:
        (B, C, H, W), same dtype and device.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded_w = w + 2 * padding
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images  # zeros, as torchvision's F.pad
    rows = top.to(dev).view(b, 1) + torch.arange(h, device=dev)  # (B, H)
    cols_ar = torch.arange(w, device=dev)
    cols = left.to(dev).view(b, 1) + torch.where(flip.to(dev).view(b, 1), w - 1 - cols_ar, cols_ar)  # (B, W)
    src = (rows.view(b, h, 1) * padded_w + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, src).view(b, c, h, w)


class ResidentSplit:
    """One split held as uint8 (N, C, H, W) and int64 labels, copied once to the device of the first batch.

    Args:
        images: uint8 (N, C, H, W) on the CPU.
        labels: int64 (N,).
        mean, std: per-channel statistics of ``Normalize`` (as many as the output channels).
        channels: output channels; a 1-channel split is replicated to this many (MNIST -> 3), as the classic
            path does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 channels: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"a resident split is uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.cpu = (images.contiguous(), labels.to(torch.int64))
        self.channels = channels or images.shape[1]
        self.mean, self.std = tuple(mean), tuple(std)
        self._on: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.cpu[1].shape[0]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images, labels, mean, std)`` on ``device``; the first call for a device copies the split there."""
        if self._on is None or self._on[0].device != device:
            images, labels = self.cpu
            c = images.shape[1]
            # float32 (C, 1, 1), as torchvision's Normalize builds them
            mean = torch.as_tensor(self.mean[:c], dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(self.std[:c], dtype=torch.float32).view(-1, 1, 1)
            self._on = tuple(t.to(device) for t in (images, labels, mean, std))  # type: ignore[assignment]
        assert self._on is not None
        return self._on

    def batch(self, indices: torch.Tensor, device: torch.device, aug: DeviceAugmentation | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised float32 batch of ``indices`` (augmented when ``aug``) and its labels, on ``device``."""
        images, labels, mean, std = self.on(device)
        idx = indices.to(device, non_blocking=True)
        x = images.index_select(0, idx)
        if aug is not None and (aug.padding > 0 or aug.flip):
            top, left, flip = draw_crop_flip(idx.shape[0], aug, generator, device)
            x = crop_flip(x, top, left, flip, aug.padding)
        return self.normalize(x, mean, std), labels.index_select(0, idx)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 in the operations of ``ToTensor`` then ``Normalize`` (bit for bit)."""
        x = x.to(torch.float32).div_(255).sub_(mean).div_(std)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, rank)."""
    words = [int(seed) % 2**64, int(epoch), int(rank), 0xDA7A]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


class ResidentBatches:
    """The device path's ``collate_fn``: a list of dataset indices -> the batch, formed on the device.

    The device is that of the attached Trainer's strategy (``root_device``: the rank's GPU under DDP), else
    the CPU. Crop/flip draws come from a generator on that device, reseeded by :meth:`start_epoch`.
    """

    def __init__(self, datamodule: ImageClassificationDataModule, split: ResidentSplit,
                 aug: DeviceAugmentation | None) -> None:
        self.datamodule, self.split, self.aug = datamodule, split, aug
        self._seed: int | None = None
        self._generator: torch.Generator | None = None

    def start_epoch(self, seed: int, epoch: int, rank: int = 0) -> None:
        """Draws of the coming iteration: a function of (seed, epoch, rank) only."""
        self._seed, self._generator = _epoch_seed(seed, epoch, rank), None

    def _draws(self, device: torch.device) -> torch.Generator | None:
        if self.aug is None:
            return None
        if self._generator is None or self._generator.device != device:
            if self._seed is None:  # iterated without ResidentLoader: seeded from the global RNG
                self._seed = int(torch.randint(2**62, ()))
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.datamodule.resident_device()
        return self.split.batch(torch.as_tensor(indices, dtype=torch.int64), device, self.aug, self._draws(device))


class _Indices(Dataset):
    """The dataset of the device path's loader: item i is i (``collate_fn`` forms the batch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return int(index)

    def __getitems__(self, indices: list[int]) -> list[int]:  # the DataLoader's batched fetch: no per-item call
        return list(indices)


class ResidentLoader(DataLoader):
    """A ``DataLoader`` whose ``collate_fn`` is :class:`ResidentBatches`; at each iteration it seeds the
    augmentation draws from its sampler's (seed, epoch, rank) -- the sampler Lightning may have swapped in.

    Same constructor as ``DataLoader``, so Lightning rebuilds it with a ``DistributedSampler`` under DDP.
    """

    def __iter__(self) -> Any:
        collate, sampler = self.collate_fn, self.sampler
        if isinstance(collate, ResidentBatches) and collate.aug is not None:
            seed = getattr(sampler, "seed", None)
            if seed is None:
                seed = int(torch.randint(2**62, ()))
            # EpochSeededRandomSampler and DistributedSampler both hold the epoch they are about to iterate
            collate.start_epoch(seed, getattr(sampler, "epoch", 0), getattr(sampler, "rank", 0))
        return super().__iter__()


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base class: stores and checks the loader arguments and builds the three loaders.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup`` and define
    ``num_classes``, ``input_size``, ``mean`` and ``std``.

    Args:
        root: directory holding the dataset (its layout is documented by each subclass).
        batch_size: images per batch on each device.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster copies to the GPU; only used when CUDA is available.
        device: the device-resident path (module docstring): each split held once as uint8 on the training
            device, batches indexed, augmented and normalised there. ``num_workers`` and ``pin_memory`` are
            then unused (the loader only yields indices). Only for subclasses that implement
            :meth:`resident_tensors`.
    """

    def __init__(self, root: str, batch_size: int, num_workers: int = 4, pin_memory: bool = True,
                 device: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = load in the main process), got {num_workers}")
        self.root = str(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.device_resident = bool(device)
        self._resident: dict[int, tuple[Dataset, ResidentSplit]] = {}
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

    def resident_tensors(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """A loaded split as uint8 (N, C, H, W) images and int64 labels, before any transform (device path)."""
        raise NotImplementedError(f"{type(self).__name__} has no device-resident path (device: true)")

    def device_augmentation(self) -> DeviceAugmentation | None:
        """The training split's augmentation on the device path (None: none)."""
        return None

    def resident_device(self) -> torch.device:
        """Where the device path forms batches: the attached Trainer's root device, else the CPU."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cpu")

    def resident_split(self, dataset: Dataset) -> ResidentSplit:
        """The resident copy of a loaded split (made once per dataset object)."""
        entry = self._resident.get(id(dataset))
        if entry is None or entry[0] is not dataset:
            images, labels = self.resident_tensors(dataset)
            entry = (dataset, ResidentSplit(images, labels, self.mean, self.std, self.input_size[0]))
            self._resident[id(dataset)] = entry
        return entry[1]

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # drop_last=False everywhere: the reference scripts keep the last partial training batch.
        if self.device_resident:
            return self._resident_loader(dataset, shuffle)
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

    def _resident_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        split = self.resident_split(dataset)
        indices = _Indices(len(split))
        collate = ResidentBatches(self, split, self.device_augmentation() if shuffle else None)
        # The classic path's sampler (order a function of (seed, epoch); Lightning swaps in its
        # DistributedSampler under DDP), no workers (a batch is a few tensor ops), no pinning (nothing on host).
        sampler = EpochSeededRandomSampler(indices) if shuffle else None
        return ResidentLoader(indices, batch_size=self.batch_size, drop_last=False, sampler=sampler,
                              num_workers=0, collate_fn=collate)

    @staticmethod
    def _require(dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(
                f"the {split} dataset is not loaded: call datamodule.setup() first "
                "(the Trainer does this for you)"
            )
        return dataset
