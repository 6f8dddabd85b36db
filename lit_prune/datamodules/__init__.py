"""LightningDataModules of lit-prune: CIFAR-10/100, ImageNet (ImageFolder), and 5k MNIST for the quickstart.

Every module has the same constructor core (``root``, ``batch_size``, ``num_workers``, ``pin_memory``) and
exposes ``num_classes`` and ``input_size`` (C, H, W) right after ``__init__``.
"""

from lit_prune.datamodules.base import ImageClassificationDataModule
from lit_prune.datamodules.cifar import CIFARDataModule
from lit_prune.datamodules.imagenet import ImageNetDataModule
from lit_prune.datamodules.mnist import MNIST5kDataModule

__all__ = ["CIFARDataModule", "ImageClassificationDataModule", "ImageNetDataModule", "MNIST5kDataModule"]
