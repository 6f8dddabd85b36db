"""Small utilities shared by the pruning tests: tiny in-memory data, randomised BN, masks from keeps."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune.core.groups import channel_groups
from lit_prune.core.masks import Masks, group_masks, merge


class RandomImageDataModule(pl.LightningDataModule):
    """``num_samples`` random 3x32x32 images with random labels, in memory (fast, no files).

    The same seed gives the same tensors, so two Trainers see identical data.
    """

    def __init__(self, num_samples: int = 48, batch_size: int = 16, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (num_samples,), generator=g)
        self.batch_size = batch_size
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _loader(self, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(False)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BN running stats and affine parameters.

    With the default init (gamma 1, beta 0, mean 0, var 1) a zeroed channel stays zero through BN,
    so masked-vs-pruned comparisons would pass even if the mask forgot the BN; random values make a
    forgotten beta or running mean visible.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.randn(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g))


def masks_from_keeps(model: nn.Module, keeps: Mapping[str, torch.Tensor]) -> Masks:
    """The structured masks that simulate ``prune_groups(model, keeps)``."""
    groups = {g.name: g for g in channel_groups(model)}
    return merge(*(group_masks(model, groups[name], keep) for name, keep in keeps.items()))
