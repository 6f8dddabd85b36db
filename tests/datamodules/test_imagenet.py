"""ImageNetDataModule on a tiny ImageFolder of generated JPEG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ImageNetDataModule

CLASSES = ("n01440764", "n01443537")
GRAY = 128  # every val image of the second class is uniform gray


def write_image_folder(root: Path, classes=CLASSES, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = 40 + 4 * i, 48  # non-square, different sizes: the transforms must unify them
                if split == "val" and label == 1:
                    pixels = np.full((h, w, 3), GRAY, dtype=np.uint8)
                else:
                    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=95)


def test_loaders_shapes_labels_and_num_classes_from_folder(tmp_path):
    write_image_folder(tmp_path)
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=32, resize_size=36)
    assert dm.num_classes == 2 and dm.input_size == (3, 32, 32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.manual_seed(0)
    assert not torch.equal(dm.train_set[0][0], dm.train_set[0][0])  # RandomResizedCrop + flip

    val = [(x, y) for x, y in dm.val_dataloader()]
    xs, ys = torch.cat([x for x, _ in val]), torch.cat([y for _, y in val])
    assert xs.shape == (6, 3, 32, 32)
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]  # sorted folder order, not shuffled
    # A uniform gray JPEG stays (nearly) uniform: normalised with the ImageNet statistics.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(xs[3].mean(dim=(1, 2)), (GRAY / 255 - mean) / std, atol=0.03, rtol=0)
    # Deterministic validation transform; test loader = val/.
    again = torch.cat([x for x, _ in dm.test_dataloader()])
    assert torch.equal(xs, again)


def test_default_size_is_224(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    dm = ImageNetDataModule(str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("validate")
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 224, 224) and dm.input_size == (3, 224, 224)


def test_num_classes_defaults_to_1000_without_data_and_explicit_value_wins(tmp_path):
    assert ImageNetDataModule(str(tmp_path / "absent"), batch_size=2).num_classes == 1000
    write_image_folder(tmp_path, per_class=1)
    assert ImageNetDataModule(str(tmp_path), batch_size=2, num_classes=1000).num_classes == 1000
    too_few = ImageNetDataModule(str(tmp_path), batch_size=2, num_workers=0, num_classes=1)
    with pytest.raises(ValueError, match="2 class folders but num_classes=1"):
        too_few.setup("fit")


def test_missing_folder_error_names_folder_and_layout(tmp_path):
    dm = ImageNetDataModule(str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "train") in message and "train/<class>/<image>.JPEG" in message


def test_train_and_val_classes_must_match(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    extra = tmp_path / "val" / "n99999999"
    extra.mkdir()
    Image.new("RGB", (40, 40)).save(extra / "x.JPEG")
    dm = ImageNetDataModule(str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="n99999999"):
        dm.setup("validate")


def test_an_empty_class_folder_is_named(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    for f in (tmp_path / "train" / CLASSES[1]).iterdir():
        f.unlink()
    dm = ImageNetDataModule(str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    assert f"empty class folders in {tmp_path / 'train'}: ['{CLASSES[1]}']" in str(err.value)


def test_invalid_sizes(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        ImageNetDataModule(str(tmp_path), batch_size=2, image_size=256, resize_size=224)
