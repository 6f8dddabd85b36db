"""ThiNetPruning: planning, validation, a real Trainer run, the prune CLI with --data-config, and DDP."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ThiNetPruning
from lit_prune.artifact import build_model, load_artifact, load_model, make_artifact, save_artifact
from lit_prune.cli.prune import main as prune_main
from lit_prune.core.flops import count_flops
from lit_prune.methods.thinet import ThiNetReconstruction
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from tests.helpers import clean_env, run_process

REPO = Path(__file__).resolve().parents[2]
CFG = [8, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8]
HALF = [4, "M", 4, "M", 4, 4, "M", 4, 4, "M", 4, 4]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cifar_vgg11", cfg=CFG).eval()


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long)),
                      batch_size=16)


# ---- arguments and planning --------------------------------------------------------------------------------


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of target"):
        ThiNetPruning()
    with pytest.raises(ValueError, match="exactly one of target"):
        ThiNetPruning(target="thinet70", prune_ratio=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ThiNetPruning(prune_ratio=0.7 + 0.3)
    with pytest.raises(ValueError, match="num_images must be a positive int"):
        ThiNetPruning(prune_ratio=0.5, num_images=0)
    with pytest.raises(ValueError, match="positions_per_image"):
        ThiNetPruning(prune_ratio=0.5, positions_per_image=-1)
    with pytest.raises(ValueError, match="ridge"):
        ThiNetPruning(prune_ratio=0.5, ridge=-1.0)
    with pytest.raises(ValueError, match="finetune_steps must be an int >= 0"):
        ThiNetPruning(prune_ratio=0.5, finetune_steps=-1)
    with pytest.raises(ValueError, match="finetune_lr must be a number > 0"):
        ThiNetPruning(prune_ratio=0.5, finetune_steps=5, finetune_lr=0)
    with pytest.raises(ValueError, match="finetune_weight_decay must be a number >= 0"):
        ThiNetPruning(prune_ratio=0.5, finetune_weight_decay=-1e-4)


def test_thinet70_target_on_resnet50_prunes_conv1_and_conv2_of_every_bottleneck() -> None:
    torch.manual_seed(0)
    model = create_model("resnet50")
    plan = dict(ThiNetPruning(target="thinet70").pruner.plan(model))
    # docs/paper-settings.md §2.7: 44/89/179/358 channels per stage for conv1 and conv2 of all 16 blocks
    expected = {}
    for stage, (blocks, keep) in enumerate(zip((3, 4, 6, 3), (44, 89, 179, 358)), start=1):
        for b in range(blocks):
            expected[f"layer{stage}.{b}.conv1"] = expected[f"layer{stage}.{b}.conv2"] = keep
    assert plan == expected
    assert list(dict(ThiNetPruning(prune_ratio=0.3).pruner.plan(model)).values()) == list(expected.values())


def test_plan_respects_layers_skip_and_patterns() -> None:
    model = _model()
    cb = ThiNetPruning(prune_ratio={"features.1*": 0.75, "*": 0.5}, layers=["features.*"], skip=["features.25"])
    plan = dict(cb.pruner.plan(model))
    assert plan == {"features.0": 4, "features.4": 4, "features.8": 4, "features.11": 2, "features.15": 2,
                    "features.18": 2, "features.22": 4}
    with pytest.raises(ValueError, match="skip pattern 'layer9' matches no prunable layer"):
        ThiNetPruning(prune_ratio=0.5, skip=["layer9"]).pruner.plan(model)
    with pytest.raises(KeyError, match="no width config named 'Z'"):
        ThiNetPruning(target="Z").pruner.plan(model)


def test_needs_data() -> None:
    cb = ThiNetPruning(prune_ratio=0.5)
    assert cb.needs_data
    with pytest.raises(ValueError, match="needs training images"):
        cb.prune(_model())
    with pytest.raises(ValueError, match="needs training images"):  # the same contract as every method's select
        cb.select(_model())


def test_prune_without_trainer_records_the_sampling_and_leaves_the_model_alone() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = ThiNetPruning(prune_ratio=0.5, num_images=24, positions_per_image=5, seed=3, artifact_path=None)
    art = cb.prune(model, dataloader=_loader())
    assert art.architecture.kwargs["cfg"] == HALF
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    settings = art.provenance.settings
    assert (settings["seed"], settings["num_images"], settings["positions_per_image"]) == (3, 24, 5)
    layers = settings["layer_results"]
    assert [r["layer"] for r in layers] == [n for n, _ in cb.pruner.plan(model)]
    assert layers[0]["samples"] == 24 * 5  # 24 images x 5 positions of the 16x16 map
    assert all(r["error_reconstructed"] <= r["error_removed"] + 1e-12 for r in layers)
    # same seed, same decision
    again = ThiNetPruning(prune_ratio=0.5, num_images=24, positions_per_image=5, seed=3, artifact_path=None)
    art2 = again.prune(model, dataloader=_loader())
    assert all(torch.equal(art.state_dict[k], v) for k, v in art2.state_dict.items())


def _learnable(n: int = 64) -> DataLoader:
    # the label is the sign of the mean of the red channel: a fine-tune can learn it in a few steps
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0].mean(dim=(1, 2)) > 0).long()), batch_size=16)


def _loss(net: torch.nn.Module, loader: DataLoader) -> float:
    with torch.no_grad():
        return sum(float(torch.nn.functional.cross_entropy(net(x), y)) for x, y in loader) / len(loader)


@pytest.mark.parametrize("cls", ["thinet", "channel_pruning"])
def test_fine_tuning_between_layers_lowers_the_loss_and_feeds_the_next_layer(cls) -> None:
    from callbacks import ChannelPruning

    make = ThiNetPruning if cls == "thinet" else ChannelPruning
    model, data = _model(), _learnable()
    runs = {}
    for steps in (0, 12):
        cb = make(prune_ratio=0.5, layers=["features.0", "features.4"], num_images=32, finetune_steps=steps,
                  finetune_lr=0.05, artifact_path=None)
        art = cb.prune(model, dataloader=data)
        runs[steps] = (cb.results, _loss(build_model(art).eval(), data), art)
    (plain, plain_loss, _), (tuned, tuned_loss, tuned_art) = runs[0], runs[12]
    assert tuned_loss < plain_loss
    assert all("finetune_loss_first" not in r for r in plain)
    assert all(r["finetune_loss_last"] < r["finetune_loss_first"] for r in tuned)
    assert tuned_art.provenance.settings["finetune_steps"] == 12
    # the first layer's decision is the same; the second one reads the fine-tuned network
    assert plain[0]["error_reconstructed"] == tuned[0]["error_reconstructed"]
    assert plain[1]["error_removed"] != tuned[1]["error_removed"]


def test_progress_is_logged_while_a_layer_collects_its_statistics(caplog, monkeypatch) -> None:
    monkeypatch.setattr(ThiNetReconstruction, "progress_seconds", 0.0)  # a line after every batch but the last
    cb = ThiNetPruning(prune_ratio=0.5, layers=["features.0", "features.4"], num_images=32, artifact_path=None)
    with caplog.at_level(logging.INFO):
        cb.prune(_model(), dataloader=_loader())  # 2 batches of 16
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"thinet: features\.0 \(layer 1/2\): 16/32 images \(50%\), \d+ s", m) for m in lines)
    assert any(m.startswith("thinet: features.4 (layer 2/2): 16/32 images") for m in lines)
    assert not any("32/32 images" in m for m in lines)  # the per-layer result line follows instead


def test_a_residual_branch_pruned_to_zero_vanishes() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", cfg=[4, 4, 4, 8, 8, 8, 16, 16, 16]).eval()
    cb = ThiNetPruning(prune_ratio={"layer1.0.*": 0.9, "*": 0.5}, num_images=16, artifact_path=None)
    art = cb.prune(model, dataloader=_loader(16))
    assert art.architecture.kwargs["cfg"] == [0, 2, 2, 4, 4, 4, 8, 8, 8]
    assert [r["layer"] for r in cb.results][0] == "layer1.1.conv1"  # the vanished branch needs no refit
    assert build_model(art)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---- a real Trainer run ------------------------------------------------------------------------------------


def test_fit_writes_a_loadable_artifact_with_the_requested_widths(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    module = ImageClassifier(arch="cifar_vgg11", cfg=CFG, num_classes=tiny_data.num_classes, lr=0.05)
    cb = ThiNetPruning(prune_ratio={"features.0": 0.25, "*": 0.5}, num_images=32, batch_size=8)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=tmp_path, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=tiny_data)

    path = Path(trainer.log_dir) / "pruned.pt"
    assert path.is_file() and cb.written == str(path)
    raw = torch.load(path, weights_only=True)
    assert raw["architecture"]["kwargs"]["cfg"] == [6] + HALF[1:]
    assert raw["provenance"]["method"] == "thinet"
    assert raw["flops"]["dense"]["macs"] == count_flops(module.model).macs
    assert [m.out_channels for m in module.model.features if isinstance(m, torch.nn.Conv2d)] == [8] * 8
    pruned = load_model(path)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, tiny_data.num_classes)


# ---- the prune CLI -----------------------------------------------------------------------------------------

DATA = {"class_path": "tests.helpers.RandomImageDataModule", "init_args": {"num_samples": 32, "batch_size": 16}}


def _cli_inputs(tmp_path: Path) -> tuple[Path, Path]:
    weights = tmp_path / "large.pt"  # an artifact is a valid --checkpoint: the tiny width needs no --arch
    save_artifact(make_artifact(_model(), method="dense"), weights)
    method = tmp_path / "thinet.yaml"
    method.write_text(yaml.safe_dump({"class_path": "callbacks.ThiNetPruning",
                                      "init_args": {"prune_ratio": 0.5, "num_images": 16}}))
    return weights, method


@pytest.mark.parametrize("form", ["entry", "training_config"])
def test_prune_cli_passes_the_datamodule_to_a_data_driven_method(tmp_path: Path, form: str) -> None:
    weights, method = _cli_inputs(tmp_path)
    data = tmp_path / "data.yaml"
    doc = DATA if form == "entry" else {"model": {"arch": "cifar_vgg11"}, "trainer": {"max_epochs": 1}, "data": DATA}
    data.write_text(yaml.safe_dump(doc))
    out = tmp_path / "pruned.pt"
    rc = prune_main(["--checkpoint", str(weights), "--config", str(method), "--data-config", str(data),
                     "--out", str(out)])
    assert rc == 0
    art = load_artifact(out)
    assert art.architecture.kwargs["cfg"] == HALF
    assert art.provenance.source == str(weights)


def test_prune_cli_asks_for_data(tmp_path: Path, capsys) -> None:
    weights, method = _cli_inputs(tmp_path)
    rc = prune_main(["--checkpoint", str(weights), "--config", str(method), "--out", str(tmp_path / "p.pt")])
    assert rc == 2
    assert "ThiNetPruning samples training images: give --data-config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1}}))
    rc = prune_main(["--checkpoint", str(weights), "--config", str(method), "--data-config", str(bad),
                     "--out", str(tmp_path / "p.pt")])
    assert rc == 2 and "must name a datamodule" in capsys.readouterr().err


# ---- DDP (2 CPU processes, gloo) ---------------------------------------------------------------------------

PROBE = '''
"""Test-only ThiNet callback recording, on each rank, its images and its decision before the broadcast."""
import os

import torch

from callbacks import ThiNetPruning


class ProbeThiNet(ThiNetPruning):
    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self._seen = {}
        sample, refit = self.pruner._sample_loader, self.pruner.reconstruct_group
        self.pruner._sample_loader = lambda *a: self._sampled(sample(*a))
        self.pruner.reconstruct_group = lambda *a: self._refitted(a[2], refit(*a))

    def _sampled(self, loader):
        self._seen["images"] = list(loader.dataset.indices)
        return loader

    def _refitted(self, group, rec):
        self._seen[group.name] = {"keep": rec.keep.cpu(), "weight": rec.weight.cpu(), "samples": rec.samples}
        return rec

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(self._seen, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
'''



def run_ddp(tmp_path: Path, probe: str, class_path: str, init_args: dict) -> tuple[Path, list[dict]]:
    """``train.py fit`` on 2 CPU processes with a probe callback; returns the run dir and each rank's record."""
    (tmp_path / "ddp_probe.py").write_text(probe)
    out = tmp_path / "probe"
    out.mkdir()
    run = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "strategy": "ddp", "devices": 2, "max_epochs": 1, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(run),
                    "callbacks": [{"class_path": class_path, "init_args": {"out_dir": str(out), **init_args}}]},
        "checkpoint": {"save_last": False},
        "model": {"arch": "cifar_vgg11", "cfg": CFG, "lr": 0.05},
        "data": {"class_path": "tests.helpers.RandomImageDataModule",
                 "init_args": {"num_samples": 64, "batch_size": 16}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(yaml.safe_dump(config)))
    run_process([sys.executable, str(REPO / "train.py"), "fit", "--config", str(path)], tmp_path,
                clean_env(tmp_path))
    return run, [torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1)]


def test_ddp_ranks_share_statistics_and_write_one_artifact(tmp_path: Path) -> None:
    # with fine-tuning between layers: identical weights on both ranks need the gradients averaged
    run, ranks = run_ddp(tmp_path, PROBE, "ddp_probe.ProbeThiNet",
                         {"prune_ratio": 0.5, "num_images": 32, "finetune_steps": 2, "finetune_lr": 0.05})
    # each rank sampled its own half of the 32 images ...
    assert len(ranks[0]["images"]) == len(ranks[1]["images"]) == 16
    assert not set(ranks[0]["images"]) & set(ranks[1]["images"])
    # ... and after the all-reduce both hold the statistics of all 32 (10 positions each on 16x16) and decide alike
    assert ranks[0]["features.0"]["samples"] == ranks[1]["features.0"]["samples"] == 320
    layers = [k for k in ranks[0] if k != "images"]
    assert len(layers) == 8
    for name in layers:
        assert torch.equal(ranks[0][name]["keep"], ranks[1][name]["keep"]), name
        torch.testing.assert_close(ranks[0][name]["weight"], ranks[1][name]["weight"], rtol=0, atol=0)
    artifacts = sorted(run.rglob("*.pt"))
    assert [p.name for p in artifacts] == ["pruned.pt"], artifacts
    art = load_artifact(artifacts[0])
    assert art.architecture.kwargs["cfg"] == HALF
    assert art.provenance.settings["num_images"] == 32
    assert all("finetune_loss_last" in r for r in art.provenance.settings["layer_results"])
