"""ImageNet (ILSVRC-2012) as a torchvision ``ImageFolder``, with the paper's transforms (paper-spec 1.2).

Layout::

    <root>/train/<class>/<image>.JPEG     e.g. train/n01440764/n01440764_10026.JPEG
    <root>/val/<class>/<image>.JPEG       the same class folders as train/

The official validation archive is flat (50,000 images in one folder); sort it into class folders first
(the usual ``valprep.sh`` script). Validation and test both use ``val/``, as in the paper.

Train transform: RandomResizedCrop(``image_size``), random horizontal flip, ToTensor, Normalize.
Val transform: Resize(``resize_size``) of the shorter side, CenterCrop(``image_size``), ToTensor, Normalize.

Example (YAML, LightningCLI)::

    data:
      class_path: datamodules.ImageNetDataModule
      init_args:
        root: /datasets/imagenet
        batch_size: 256
        num_workers: 16
"""

from __future__ import annotations

import os

from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from lit_prune.datamodules.base import ImageClassificationDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_NUM_CLASSES = 1000


def _class_folders(folder: str) -> list[str]:
    """Sorted subdirectory names of ``folder``: the classes, in ImageFolder's index order."""
    # The same rule as torchvision's ``find_classes``, so that the count matches the labels.
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet from ``<root>/train`` and ``<root>/val`` class folders.

    Args:
        root: directory holding ``train/`` and ``val/``.
        batch_size: images per batch on each device (the paper: 256 in total).
        num_workers: DataLoader worker processes (JPEG decoding is the bottleneck: use many).
        pin_memory: pin host memory (only used when CUDA is available).
        image_size: side of the square crop the model receives.
        resize_size: shorter side after resizing, before the validation centre crop.
        num_classes: number of classes. ``None`` counts the class folders of ``<root>/train`` when it
            exists (so a subset of ImageNet works unchanged), else 1000.
        device: refused: ImageNet does not fit in device memory (the device-resident path is for CIFAR and
            MNIST); accepted as ``false`` so that every datamodule has the option.

    Raises:
        ValueError: on non-positive sizes, ``resize_size < image_size``, ``num_classes < 1`` or
            ``device: true``.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        image_size: int = 224,
        resize_size: int = 256,
        num_classes: int | None = None,
        device: bool = False,
    ) -> None:
        if device:
            raise ValueError(
                "ImageNetDataModule does not support `device: true`: the device-resident path holds a whole "
                "split in device memory as uint8, which is for the small datasets (CIFAR-10/100, MNIST-5k); "
                "ImageNet's 1.28M training images at 224x224 would need ~190 GB. Use the classic path "
                "(`device: false`, the default) with enough `num_workers` for JPEG decoding."
            )
        super().__init__(root, batch_size, num_workers, pin_memory)
        if image_size < 1 or resize_size < image_size:
            raise ValueError(
                "need 0 < image_size <= resize_size (224 and 256 in the paper), "
                f"got image_size={image_size}, resize_size={resize_size}"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(
                f"num_classes must be a positive int or None (read from train/), got {num_classes}"
            )
        self.save_hyperparameters(ignore=["num_classes"])  # the model records the resolved count
        self.image_size = image_size
        self.resize_size = resize_size
        # Decided here, not in setup: LightningCLI links data.num_classes to the model at instantiation.
        if num_classes is None:
            train_dir = os.path.join(self.root, "train")
            num_classes = len(_class_folders(train_dir)) if os.path.isdir(train_dir) else _DEFAULT_NUM_CLASSES
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean subtracted by Normalize."""
        return IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std divided by Normalize."""
        return IMAGENET_STD

    def train_transform(self) -> T.Compose:
        """RandomResizedCrop, flip, ToTensor, Normalize."""
        return T.Compose(
            [
                T.RandomResizedCrop(self.image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def val_transform(self) -> T.Compose:
        """Resize the shorter side, centre crop, ToTensor, Normalize."""
        return T.Compose(
            [
                T.Resize(self.resize_size),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._load("train", self.train_transform())
        if stage != "predict" and self.val_set is None:
            self.val_set = self._load("val", self.val_transform())
            self.test_set = self.val_set

    def _load(self, split: str, transform: T.Compose) -> ImageFolder:
        folder = os.path.join(self.root, split)
        if not os.path.isdir(folder) or not _class_folders(folder):
            raise FileNotFoundError(
                f"ImageNet {split} split not found: expected class folders in {folder}, laid out as "
                f"{split}/<class>/<image>.JPEG (e.g. {split}/n01440764/n01440764_10026.JPEG), with the same "
                "class folders in train/ and val/. The official val archive is flat: sort it into class "
                "folders first (valprep.sh)."
            )
        if split == "val":
            self._check_same_classes()
        try:
            dataset = ImageFolder(folder, transform=transform)
        except FileNotFoundError as err:  # torchvision names the empty classes, not where they are
            empty = [c for c in _class_folders(folder) if not any(os.scandir(os.path.join(folder, c)))][:5]
            where = f"empty class folders in {folder}: {empty} (first 5)" if empty else f"in {folder}: {err}"
            raise FileNotFoundError(f"ImageNet {split} split has {where}; every class folder needs at least one "
                                    "image (.JPEG, .png, ...): add its images or remove the folder from both "
                                    "train/ and val/") from None
        if len(dataset.classes) > self.num_classes:
            raise ValueError(
                f"{folder} has {len(dataset.classes)} class folders but num_classes={self.num_classes}: "
                "labels would exceed the model's outputs. Leave num_classes unset to read it from train/."
            )
        return dataset

    def _check_same_classes(self) -> None:
        # ImageFolder numbers classes by sorted folder name, per folder: a class missing from val/ would
        # silently shift every later label.
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):  # evaluation-only copy of the data
            return
        train, val = _class_folders(train_dir), _class_folders(os.path.join(self.root, "val"))
        if train != val:
            only_train = sorted(set(train) - set(val))[:5]
            only_val = sorted(set(val) - set(train))[:5]
            raise ValueError(
                f"train/ and val/ must have the same class folders (labels are their sorted index); "
                f"only in train/: {only_train}, only in val/: {only_val} (first 5 shown)"
            )
