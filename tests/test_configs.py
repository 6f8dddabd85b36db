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


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_config_trains_one_batch(config: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write runs/ and data/ relative to the working directory
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI must read only `args`, not pytest's argv
    base = _base_of(config)
    configs = [ROOT / base, ROOT / config] if base else [ROOT / config]
    args = ["fit"] + [f"--config={c}" for c in configs] + _data_overrides(base or config, tmp_path) + [
        "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ]
    cli = main(args)
    assert cli.trainer.state.finished, f"{config} did not finish its batch"
    assert cli.trainer.global_step == 1
