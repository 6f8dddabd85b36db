"""Every YAML file in configs/ parses and trains one batch on generated data, so no config can rot.

Baseline configs run as they are (with the data pointed at generated files); method configs run on top of
the baseline config named by their first line (``# base: configs/...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lit_prune.cli.train import main
from tests.datamodules.test_cifar import write_fake_cifar
from tests.datamodules.test_imagenet import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
# configs/experiments/ holds protocol-runner configs, checked in tests/protocol/
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "experiments")


def _base_of(path: Path) -> Path | None:
    first = (ROOT / path).read_text().splitlines()[0]
    if first.startswith("# base:"):
        return Path(first.split(":", 1)[1].strip())
    return None


def _data_overrides(config: Path, tmp_path: Path) -> list[str]:
    data = yaml.safe_load((ROOT / config).read_text())["data"]
    cls = data["class_path"].rsplit(".", 1)[1]
    if cls == "CIFARDataModule":
        dataset = data["init_args"].get("dataset", "cifar10")
        write_fake_cifar(tmp_path / "data", dataset)
        return [f"--data.root={tmp_path / 'data'}", "--data.download=false", "--data.verify=false",
                "--data.batch_size=4", "--data.num_workers=0"]
    if cls == "ImageNetDataModule":
        write_image_folder(tmp_path / "imagenet")
        return [f"--data.root={tmp_path / 'imagenet'}", "--data.batch_size=2", "--data.num_workers=0",
                "--data.num_classes=null"]
    if cls == "MNIST5kDataModule":
        return ["--data.batch_size=8"]
    raise AssertionError(f"{config}: no generated data for {cls}; teach this test about it")


def test_every_config_is_covered():
    assert CONFIGS, "no configs found"
    for path in CONFIGS:
        base = _base_of(path)
        assert base is None or (ROOT / base).is_file(), f"{path} names a missing base config {base}"


#: configs whose one-batch run takes more than about 8 s on 2 CPU cores (full-size models, or a method that
#: prunes at the end of that batch): the default run only builds them (every key parsed, every class made);
#: ``-m slow`` trains their batch too
SLOW_TO_TRAIN = {
    "configs/methods/channel_pruning_vgg16_5x.yaml", "configs/cifar/weight_densenet_c100.yaml",
    "configs/cifar/weight_densenet_bc100.yaml", "configs/cifar/weight_preresnet110.yaml",
    "configs/cifar/l1_resnet110.yaml", "configs/imagenet/slim_vgg11_bn.yaml", "configs/imagenet/vgg16_bn.yaml",
    "configs/cifar/sfp_resnet110.yaml", "configs/imagenet/sss_resnet50.yaml", "configs/imagenet/vgg16.yaml",
    "configs/cifar/sfp_resnet56.yaml", "configs/cifar/weight_densenet40.yaml", "configs/cifar/lt_resnet50.yaml",
    "configs/cifar/slim_preresnet164.yaml",
}


def _args(config: Path, tmp_path: Path, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)  # configs write runs/ and data/ relative to the working directory
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI must read only `args`, not pytest's argv
    base = _base_of(config)
    configs = [ROOT / base, ROOT / config] if base else [ROOT / config]
    return [f"--config={c}" for c in configs] + _data_overrides(base or config, tmp_path) + [
        "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ]


def test_the_configs_only_built_by_default_exist():
    assert SLOW_TO_TRAIN <= {str(c) for c in CONFIGS}


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if str(c) in SLOW_TO_TRAIN else c
                                    for c in CONFIGS], ids=str)
def test_config_trains_one_batch(config: Path, tmp_path: Path, monkeypatch):
    cli = main(["fit", *_args(config, tmp_path, monkeypatch)])
    assert cli.trainer.state.finished, f"{config} did not finish its batch"
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("config", sorted(SLOW_TO_TRAIN), ids=str)
def test_slow_config_builds(config: str, tmp_path: Path, monkeypatch):
    cli = main(_args(Path(config), tmp_path, monkeypatch), run=False)
    assert cli.model.model is not None and cli.datamodule is not None and cli.trainer.max_epochs
