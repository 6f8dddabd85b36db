"""Bad input gets a clear error that names the problem, never a silent wrong result (the Python API side)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lit_prune.artifact import make_artifact
from lit_prune.callbacks import L1FilterPruning, MagnitudePruning, NetworkSlimming
from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups
from lit_prune.core.schedule import milestones_for
from lit_prune.methods.plan import WidthPlan
from lit_prune.methods.state import Counts
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier

CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]


def _resnet20() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cifar_resnet20", cfg=CFG20, num_classes=10)


def _trainer(tmp_path: Path, cb: pl.Callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, callbacks=[cb],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kwargs)


@pytest.mark.parametrize("cb", [L1FilterPruning(prune_ratio=0.5), NetworkSlimming(prune_ratio=0.5),
                                MagnitudePruning(amount=0.5)], ids=["l1", "slimming", "magnitude"])
def test_non_finite_weights_are_refused_before_any_decision(cb, tmp_path: Path) -> None:
    model = _resnet20()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight has 1 NaN or infinite"):
        cb.prune(model, path=str(tmp_path / "p.pt"))
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_diverged_training_stops_saying_so(tmp_path: Path, tiny_data) -> None:
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10)
    with torch.no_grad():
        module.model.fc.weight.fill_(float("inf"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="training loss is nan.*diverged"):
        trainer.fit(module, datamodule=tiny_data)


def test_milestones_must_increase_and_late_ones_are_reported(caplog) -> None:
    with pytest.raises(ValueError, match=r"milestones must be increasing epochs >= 1, got \[120, 80\]"):
        milestones_for("multistep", 160, [120, 80])
    with caplog.at_level(logging.WARNING):
        assert milestones_for("multistep", 100, [50, 150]) == [50, 150]
    assert "[150] are not before max_epochs 100" in caplog.text


def test_a_layer_pattern_shadowed_by_an_earlier_one_is_refused() -> None:
    model = _resnet20()
    groups = [g for g in channel_groups(model) if g.conv is not None]
    with pytest.raises(ValueError, match=r"prune_ratio pattern 'layer1\.0\.\*' never applies.*\['layer1\.\*'\]"):
        WidthPlan(prune_ratio={"layer1.*": 0.5, "layer1.0.*": 0.2}).counts(model, groups)
    with pytest.raises(ValueError, match=r"keep pattern 'layer2\.0\.conv1' never applies"):
        WidthPlan(keep={"layer2.*": 4, "layer2.0.conv1": 2}).counts(model, groups)
    # specific first, then a default: the first match wins, every pattern applies somewhere
    counts = WidthPlan(prune_ratio={"layer1.0.*": 0.75, "*": 0.5}).counts(model, groups)
    assert counts["layer1.0.conv1"] == 1 and counts["layer1.1.conv1"] == 2


def test_a_run_that_trains_no_batch_fails_instead_of_writing_no_artifact(tmp_path: Path, tiny_data) -> None:
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10)
    trainer = _trainer(tmp_path, L1FilterPruning(prune_ratio=0.5), max_epochs=1, limit_train_batches=0)
    with pytest.raises(ValueError, match="L1FilterPruning never ran: this fit trained no batch"):
        trainer.fit(module, datamodule=tiny_data)


def test_gradual_pruning_that_would_end_after_the_run_is_reported(tmp_path: Path, tiny_data) -> None:
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10)
    cb = MagnitudePruning(amount=0.5, start_epoch=0, end_epoch=5)
    with pytest.warns(UserWarning, match=r"end_epoch 5 is not an epoch of this run \(max_epochs 2.*before the target"):
        _trainer(tmp_path, cb, max_epochs=2).fit(module, datamodule=tiny_data)


def test_exact_zero_weights_of_a_physically_pruned_model_do_not_change_its_flops() -> None:
    dense = _resnet20()
    pruned = _resnet20()
    with torch.no_grad():
        pruned.layer1[0].conv1.weight[0].zero_()  # a dead filter, not a pruned one: no mask says it is gone
    counts = count_flops(dense)
    art = make_artifact(pruned, method="test", dense=Counts(macs=counts.macs, params=counts.params))
    assert art.flops.pruned.macs == counts.macs and art.flops.ratio == 1.0
    # with a mask saying it is gone, the same zeros are pruned weights
    masks = {"layer1.0.conv1.weight": pruned.layer1[0].conv1.weight.detach() != 0}
    masked = make_artifact(pruned, method="test", dense=Counts(macs=counts.macs, params=counts.params), masks=masks)
    assert masked.flops.pruned.macs < counts.macs


def _bad_checkpoint(kind: str, d: Path) -> Path:
    path = d / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "junk":
        path.write_text("not a checkpoint")
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": nothing there


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "no checkpoint at"), ("empty", "is empty (0 bytes)"), ("junk", "is not a readable checkpoint"),
    ("directory", "(a directory)"),
])
def test_the_prune_cli_names_a_bad_checkpoint_and_writes_nothing(kind: str, message: str, tmp_path: Path,
                                                                 capsys) -> None:
    from lit_prune.cli.prune import main

    ckpt = _bad_checkpoint(kind, tmp_path)
    out = tmp_path / "out" / "pruned.pt"
    method = Path(__file__).resolve().parents[1] / "configs" / "methods" / "l1_quickstart.yaml"
    assert main(["--checkpoint", str(ckpt), "--config", str(method), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(ckpt) in err and "Traceback" not in err
    assert not out.exists()
