"""The artifact of a model outside the zoo: its builder and the surgery's cuts, replayed on a fresh network.

torchvision and timm models are rebuilt by name (``torchvision:<name>``, ``timm:<name>``, random weights), a
user's own builder only when the caller passes it; a model that no file could rebuild is refused before it is
pruned; every regime starts from the rebuilt model; FLOPs are counted at the datamodule's input size.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from callbacks import L1FilterPruning, MagnitudePruning, SoftFilterPruning
from lit_prune.artifact import build_model, load_artifact, load_model
from lit_prune.cli.flops import main as flops_main
from lit_prune.core.flops import count_flops
from lit_prune.methods.state import cpu_copy
from lit_prune.models import create_model, rebuildable
from lit_prune.module import ImageClassifier
from tests.helpers import RandomImageDataModule, randomize_bn
from tests.user_models.test_user_methods import UserModule, tiny_resnet

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor = X) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def _pruned(net: nn.Module, tmp_path: Path, **kwargs) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    randomize_bn(net)
    path = tmp_path / "pruned.pt"
    L1FilterPruning(prune_ratio=0.4, aggregate="sum", **kwargs).prune(net.eval(), path=str(path),
                                                                      input_size=(3, 32, 32))
    return net, path


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.squeezenet1_1(num_classes=10),  # built by the user: its builder is recognised
    lambda: create_model("timm:test_efficientnet", num_classes=10),  # SE blocks, depthwise convs
], ids=["torchvision", "timm"])
def test_the_artifact_rebuilds_the_pruned_model_exactly(build, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, path = _pruned(build(), tmp_path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers
    assert raw["version"] == 1 and raw["architecture"]["edits"]
    assert raw["architecture"]["name"] in ("torchvision:squeezenet1_1", "timm:test_efficientnet")
    rebuilt = load_model(path)
    assert type(rebuilt) is type(net) and rebuilt is not net
    assert _same_outputs(rebuilt, net) == 0.0
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_a_user_builder_must_be_passed_in_and_is_never_imported_from_the_file(tmp_path: Path) -> None:
    net, path = _pruned(rebuildable(tiny_resnet, num_classes=10), tmp_path)
    assert load_artifact(path).architecture.name.startswith("user:tests.user_models.test_user_methods.tiny_resnet")
    with pytest.raises(ValueError, match=r"builder=tiny_resnet"):
        load_model(path)
    assert _same_outputs(load_model(path, builder=tiny_resnet), net) == 0.0
    with pytest.raises(ValueError, match="train it|builder"):  # the CLI's module cannot guess it either
        ImageClassifier(artifact=str(path), regime="finetune")


INITIALISED: list[nn.Module] = []


def constant_init(net: nn.Module) -> None:
    """A user's own scratch initialisation (named on the command line by its import path)."""
    INITIALISED.append(net)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.01)


def test_the_cli_takes_a_user_builder_and_init_by_import_path(tmp_path: Path, monkeypatch) -> None:
    from lit_prune.cli.train import main

    net, path = _pruned(rebuildable(tiny_resnet, num_classes=10), tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    common = [f"--model.artifact={path}", "--data=tests.helpers.RandomImageDataModule",
              "--model.builder=tests.user_models.test_user_methods.tiny_resnet",
              f"--trainer.default_root_dir={tmp_path}"]
    cli = main([*common, "--model.regime=finetune"], run=False)
    assert _same_outputs(cli.model.model, net) == 0.0
    INITIALISED.clear()
    cli = main([*common, "--model.regime=scratch", f"--model.init={__name__}.constant_init"], run=False)
    assert INITIALISED == [cli.model.model]
    assert all(bool((p == 0.01).all()) for p in cli.model.model.parameters())
    assert "init" not in cli.model.hparams and "builder" not in cli.model.hparams
    with pytest.raises(ValueError, match="scratch"):  # an init a fine-tune would silently ignore
        ImageClassifier(artifact=str(path), regime="finetune", builder=tiny_resnet, init=constant_init)


def test_a_model_no_file_can_rebuild_is_refused_before_it_is_pruned(tmp_path: Path) -> None:
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)  # no torchvision builder has this depth
    before = net.layer1[0].conv1.out_channels
    with pytest.raises(ValueError, match=r"rebuildable\(your_builder.*artifact_path: null"):
        L1FilterPruning(prune_ratio=0.5).prune(net, path=str(tmp_path / "p.pt"))
    assert net.layer1[0].conv1.out_channels == before and not (tmp_path / "p.pt").exists()
    mobilenet = torchvision.models.mobilenet_v2(width_mult=0.25)  # a builder argument no guess recovers
    with pytest.raises(ValueError, match="torchvision:mobilenet_v2.*other shapes"):
        L1FilterPruning(prune_ratio=0.5).prune(mobilenet, path=str(tmp_path / "p.pt"))
    # without an artifact to write, it is pruned in place as before
    assert L1FilterPruning(prune_ratio=0.5, artifact_path=None).prune(net) is None
    assert net.layer1[0].conv1.out_channels < before


def test_every_regime_and_the_flops_cli_start_from_the_rebuilt_model(tmp_path: Path, capsys) -> None:
    net, path = _pruned(create_model("torchvision:mobilenet_v2", width_mult=0.25, num_classes=10), tmp_path)
    art = load_artifact(path)
    tuned = ImageClassifier(artifact=str(path), regime="finetune").model
    assert _same_outputs(tuned, net) == 0.0
    scratch = ImageClassifier(artifact=str(path), regime="scratch").model
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in scratch.state_dict().items()} == shapes
    bn = scratch.features[1].conv[0][1]  # its own reset_parameters on the pruned shape, not inherited values
    assert bn.num_features < 8 and torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.running_var, torch.ones_like(bn.weight))
    assert not torch.equal(scratch.features[0][0].weight, net.features[0][0].weight)
    seen = []
    custom = build_model(art, weights=False, init=seen.append)
    assert seen == [custom]
    assert flops_main([str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs"] == art.flops.pruned.macs == count_flops(net, (3, 32, 32)).macs
    assert report["input_size"] == [3, 32, 32]


def test_a_masked_user_artifact_rewinds_to_theta0(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("torchvision:mobilenet_v2", width_mult=0.25, num_classes=10)
    theta0 = cpu_copy(net.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)  # "trained"
    path = tmp_path / "ticket.pt"
    art = MagnitudePruning(amount=0.5).prune(net, path=str(path), init_state=theta0, input_size=(3, 32, 32))
    assert art.masks and not art.architecture.edits
    ticket = ImageClassifier(artifact=str(path), regime="rewind").model
    name = "features.3.conv.0.0.weight"
    assert torch.equal(ticket.get_parameter(name), theta0[name] * art.masks[name])
    assert not torch.equal(art.masks[name], torch.ones_like(art.masks[name]))


class Data64(RandomImageDataModule):
    """A datamodule of 3x64x64 images."""

    def __init__(self) -> None:
        super().__init__(num_samples=16, batch_size=8)
        self.x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 64, 64)


def test_flops_are_counted_at_the_datamodules_input_size(tmp_path: Path, isolated) -> None:
    module = UserModule()
    dense = count_flops(tiny_resnet(), (3, 64, 64)).macs
    cb = L1FilterPruning(prune_ratio=0.5, aggregate="sum")
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, default_root_dir=tmp_path,
                         logger=CSVLogger(tmp_path, name="", version="v"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1,
                         limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="ResNet is not a zoo model"):
        trainer.fit(module, datamodule=Data64())
    expected = dense / count_flops(module.net, (3, 64, 64)).macs
    assert expected != pytest.approx(count_flops(tiny_resnet()).macs / count_flops(module.net).macs, abs=1e-6)
    art = load_artifact(cb.written)
    assert art.input_size == (3, 64, 64) and art.flops.dense.macs == dense
    assert art.flops.ratio == pytest.approx(expected, rel=1e-9)
    rows = list(csv.DictReader((tmp_path / "v" / "metrics.csv").open()))
    logged = [float(r["prune/flops_ratio"]) for r in rows if r.get("prune/flops_ratio")]
    assert logged == [pytest.approx(expected, rel=1e-6)]
    assert _same_outputs(load_model(cb.written, builder=tiny_resnet), module.net, torch.randn(1, 3, 64, 64)) == 0.0


def _fit(module: pl.LightningModule, cb: pl.Callback, tmp_path: Path, epochs: int = 1) -> None:
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], accelerator="cpu", devices=1, default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=2, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RandomImageDataModule(num_samples=32, batch_size=16))


def test_sfp_on_a_user_model_writes_both_artifacts_and_keeps_the_trained_model(tmp_path: Path, isolated) -> None:
    module = UserModule()
    cb = SoftFilterPruning(prune_ratio=0.3)
    _fit(module, cb, tmp_path, epochs=2)
    net = module.net
    assert net.layer1[0].conv1.out_channels == 64  # soft: the trained network keeps its width, with zeros
    zeroed = int((net.layer1[0].conv1.weight.flatten(1).abs().sum(1) == 0).sum())
    assert zeroed == int(64 * 0.3)
    masked = load_artifact(cb.masked_written)
    assert masked.masks and _same_outputs(load_model(cb.masked_written, builder=tiny_resnet), net) == 0.0
    small = load_model(cb.written, builder=tiny_resnet)
    assert small.layer1[0].conv1.out_channels == 64 - zeroed  # a block's inner conv loses its zero filters
    with torch.no_grad():
        assert small(X).shape == (2, 10)


def test_magnitude_pruning_on_a_user_model_writes_a_masked_artifact(tmp_path: Path, isolated) -> None:
    module = UserModule()
    cb = MagnitudePruning(amount=0.6)
    _fit(module, cb, tmp_path)
    art = load_artifact(cb.written)
    params = dict(module.net.named_parameters())
    zeros = sum(int((params[k] == 0).sum()) for k in art.masks)
    assert zeros / sum(params[k].numel() for k in art.masks) == pytest.approx(0.6, abs=0.01)
    assert all(torch.equal(params[k] == 0, ~m) for k, m in art.masks.items())
    assert art.flops.pruned.macs < 0.6 * art.flops.dense.macs
    assert _same_outputs(load_model(cb.written, builder=tiny_resnet), module.net) == 0.0


def test_torchvision_and_timm_names_build_random_models_and_unknown_names_say_how_to_list_them() -> None:
    net = create_model("torchvision:resnet18", num_classes=3)
    assert net.fc.out_features == 3 and net.input_size == (3, 224, 224)
    assert create_model("timm:test_vit", num_classes=3, img_size=32).input_size == (3, 32, 32)
    with pytest.raises(ValueError, match="never downloads"):
        create_model("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(KeyError, match=r"list_models\(\)"):
        create_model("torchvision:resnet1")
    with pytest.raises(KeyError, match="timm.list_models"):
        create_model("timm:no_such_net")
