"""CIFARDataModule on tiny fake CIFAR-10/100 written in torchvision's real on-disk format."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import CIFARDataModule

N_PER_FILE = 6
# The first test image is constant per channel: R=255, G=0, B=128.
CONSTANT_RGB = (255, 0, 128)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_fake_cifar(root: Path, dataset: str) -> dict[str, list[int]]:
    """Write a few images per file in the real layout; returns the labels written per split."""
    rng = np.random.default_rng(0)
    num_classes = 10 if dataset == "cifar10" else 100
    labels: dict[str, list[int]] = {"train": [], "test": []}
    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    else:
        folder = root / "cifar-100-python"
        files = [("train", "train"), ("test", "test")]
    folder.mkdir(parents=True)
    for name, split in files:
        # Rows of 3072 uint8: the 1024 red values, then green, then blue (row-major 32x32 planes).
        data = rng.integers(0, 256, size=(N_PER_FILE, 3072), dtype=np.uint8)
        if name in ("test_batch", "test"):
            data[0] = np.repeat(np.array(CONSTANT_RGB, dtype=np.uint8), 1024)
        file_labels = [int(v) for v in rng.integers(0, num_classes, N_PER_FILE)]
        labels[split] += file_labels
        entry = {"data": data, "filenames": [f"img{i}.png" for i in range(N_PER_FILE)]}
        if dataset == "cifar10":
            entry.update(batch_label=name, labels=file_labels)
        else:
            entry.update(fine_labels=file_labels, coarse_labels=[v // 5 for v in file_labels])
        _dump(folder / name, entry)
    if dataset == "cifar10":
        _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    else:
        _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []})
    return labels


def _concat(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("dataset,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_fake_cifar_loads_with_shapes_labels_and_normalisation(tmp_path, dataset, num_classes):
    labels = write_fake_cifar(tmp_path, dataset)
    dm = CIFARDataModule(str(tmp_path), batch_size=4, num_workers=0, dataset=dataset, verify=False)
    assert dm.num_classes == num_classes and dm.input_size == (3, 32, 32)
    dm.setup("fit")
    assert len(dm.train_set) == len(labels["train"]) and len(dm.val_set) == len(labels["test"])

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    _, train_y = _concat(dm.train_dataloader())
    assert sorted(train_y.tolist()) == sorted(labels["train"])
    assert 0 <= train_y.min() and train_y.max() < num_classes

    # Unshuffled test split: labels in file order, the constant first image normalised with the l1 stats.
    test_x, test_y = _concat(dm.test_dataloader())
    assert test_y.tolist() == labels["test"]
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    expected = (torch.tensor(CONSTANT_RGB) / 255 - mean) / std
    torch.testing.assert_close(test_x[0].mean(dim=(1, 2)), expected)
    assert torch.equal(test_x[0].amin(dim=(1, 2)), test_x[0].amax(dim=(1, 2)))  # still constant: no crop


def test_sfp_normalisation_is_per_dataset(tmp_path):
    write_fake_cifar(tmp_path, "cifar100")
    dm = CIFARDataModule(
        str(tmp_path), batch_size=2, num_workers=0, dataset="cifar100", normalization="sfp", verify=False
    )
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    mean = torch.tensor([129.3, 124.1, 112.4]) / 255
    std = torch.tensor([68.2, 65.4, 70.4]) / 255
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), (torch.tensor(CONSTANT_RGB) / 255 - mean) / std)
    assert dm.train_set is None  # the test stage does not read the training files


def test_test_loader_is_deterministic_and_train_loader_augments(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    dm = CIFARDataModule(str(tmp_path), batch_size=8, num_workers=0, verify=False)
    dm.setup("fit")
    assert dm.val_dataloader().dataset is dm.test_dataloader().dataset  # both are the test split
    assert torch.equal(_concat(dm.test_dataloader())[0], _concat(dm.test_dataloader())[0])

    torch.manual_seed(0)
    train = dm.train_set
    first = torch.stack([train[i][0] for i in range(len(train))])
    second = torch.stack([train[i][0] for i in range(len(train))])
    assert first.shape == (30, 3, 32, 32)
    assert not torch.equal(first, second)  # random crop / flip

    plain = CIFARDataModule(str(tmp_path), batch_size=8, num_workers=0, verify=False, augment=False)
    plain.setup("fit")
    assert torch.equal(plain.train_set[3][0], plain.train_set[3][0])


def test_missing_data_error_names_the_folder(tmp_path):
    dm = CIFARDataModule(str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        dm.setup("fit")
    assert "download: true" in str(err.value)
    dm100 = CIFARDataModule(str(tmp_path), batch_size=2, dataset="cifar100")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        dm100.setup("test")


def test_integrity_check_refuses_generated_data(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    dm = CIFARDataModule(str(tmp_path), batch_size=2, num_workers=0)  # verify=True by default
    with pytest.raises(RuntimeError, match="md5"):
        dm.setup("fit")


def test_failed_download_gives_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    dm = CIFARDataModule(str(tmp_path), batch_size=2, download=True)
    with pytest.raises(RuntimeError, match="could not download cifar10") as err:
        dm.prepare_data()
    assert "cifar-10-batches-py" in str(err.value) and "no network" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,match", [({"dataset": "svhn"}, "dataset"), ({"normalization": "imagenet"}, "normalization")]
)
def test_invalid_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFARDataModule(str(tmp_path), batch_size=2, **kwargs)


# ---- reading the batch files safely -------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``os.system``: what a malicious "CIFAR batch" would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _PathPayload(_Payload):
    """... or writes a file without a shell."""

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _as_if_verified(monkeypatch) -> None:
    """The verified datasets, as if the md5 of every file matched (it is read the same safe way)."""
    from lit_prune.datamodules import cifar

    for cls in (cifar._CIFAR10, cifar._CIFAR100):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
        monkeypatch.setattr(cls, "_verify_meta", lambda self: True)


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("payload", [_Payload, _PathPayload])
@pytest.mark.parametrize("name,wrap", [("data_batch_1", True), ("data_batch_1", False), ("batches.meta", False)])
def test_a_batch_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch, verify, payload, name,
                                                                      wrap):
    write_fake_cifar(tmp_path, "cifar10")
    marker = tmp_path / "marker"
    path = tmp_path / "cifar-10-batches-py" / name
    obj = payload(marker)
    _dump(path, {"data": obj, "labels": [0]} if wrap else obj)
    if verify:
        _as_if_verified(monkeypatch)
    dm = CIFARDataModule(str(tmp_path), batch_size=2, num_workers=0, verify=verify)
    with pytest.raises(ValueError, match="is not a CIFAR batch file: it asks to load") as err:
        dm.setup("fit")
    assert str(path) in str(err.value) and "could run code" in str(err.value)
    assert not marker.exists()


def test_a_truncated_batch_file_is_named(tmp_path):
    write_fake_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dm = CIFARDataModule(str(tmp_path), batch_size=2, num_workers=0, dataset="cifar100", verify=False)
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        dm.setup("test")
    assert str(path) in str(err.value)


def test_a_pickle_of_something_else_is_named(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(path, {"images": [1, 2, 3]})
    dm = CIFARDataModule(str(tmp_path), batch_size=2, num_workers=0, verify=False)
    with pytest.raises(ValueError, match="expected a dict with data") as err:
        dm.setup("test")
    assert str(path) in str(err.value)


def test_python2_style_batches_load_through_the_restricted_reader(tmp_path, monkeypatch):
    """The official files are protocol-2 pickles of numpy arrays (``_reconstruct``), read with latin1."""
    from lit_prune.datamodules.cifar import read_batch

    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "batch"
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": [1, 2], "filenames": ["a.png", "b.png"]}, f, protocol=2)
    entry = read_batch(path, ("data",))
    assert np.array_equal(entry["data"], data) and entry["labels"] == [1, 2]
    write_fake_cifar(tmp_path / "c100", "cifar100")
    _as_if_verified(monkeypatch)
    dm = CIFARDataModule(str(tmp_path / "c100"), batch_size=2, num_workers=0, dataset="cifar100", verify=True)
    dm.setup("fit")
    assert len(dm.train_set) == N_PER_FILE and dm.train_set.classes[:2] == ["f0", "f1"]
