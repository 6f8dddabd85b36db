"""Retraining regimes (docs/paper-settings.md §1.1, 1.5, 1.6): how ImageClassifier starts from a pruned artifact.

Fine-tune inherits the artifact's weights; scratch (Scratch-E/B) takes only its structure (widths,
channel-selection indices, masks) with a fresh initialisation, density-corrected for masked convs. Masks
stay enforced through real optimizer steps in both, and checkpoints rebuild the pruned model without the
artifact. The CLI evaluates an artifact with ``train.py test --model.artifact``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import L1FilterPruning, NetworkSlimming, SoftFilterPruning
from datamodules import MNIST5kDataModule
from lit_prune.artifact import load_artifact, load_model, make_artifact, save_artifact
from lit_prune.models import create_model
from lit_prune.models.base import ChannelSelection
from lit_prune.module import ImageClassifier
from tests.helpers import randomize_bn

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_CFG = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128]


pytestmark = pytest.mark.usefixtures("isolated")


def _params(module: ImageClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.named_parameters()}


def _fit(module: ImageClassifier, data: pl.LightningDataModule, root: Path, epochs: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])
    trainer.fit(module, datamodule=data)
    return trainer


# ---- artifacts ----------------------------------------------------------------------------------

@pytest.fixture
def l1_artifact(tmp_path: Path) -> Path:
    """ResNet-20 with half of every block's first-conv filters removed; BN randomised so that no
    parameter of the artifact equals a fresh initialisation (BN gamma 1 / beta 0)."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10)
    randomize_bn(model)
    path = tmp_path / "l1.pt"
    L1FilterPruning(prune_ratio=0.5).prune(model.eval(), path=str(path))
    return path


@pytest.fixture
def slim_artifact(tmp_path: Path) -> Path:
    """PreResNet-11 (one bottleneck per stage) pruned by Network Slimming: block selections read a subset."""
    torch.manual_seed(0)
    model = create_model("slim_preresnet", depth=11, num_classes=10)
    randomize_bn(model)
    path = tmp_path / "slim.pt"
    NetworkSlimming(sparsity=0.0, prune_ratio=0.4, floor=1).prune(model.eval(), path=str(path))
    return path


@pytest.fixture
def masked_artifact(tmp_path: Path) -> Path:
    """Unstructured masks keeping 25% of every conv weight of a full-width ResNet-20 (made by hand)."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10)
    randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    masks = {f"{n}.weight": torch.rand(m.weight.shape, generator=g) < 0.25
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    path = tmp_path / "masked.pt"
    save_artifact(make_artifact(model, method="hand_made", masks=masks), path)
    return path


@pytest.fixture
def sfp_artifact(tmp_path: Path) -> Path:
    """SFP's full-size artifact: 30% of the filters of every conv zeroed, with their masks."""
    torch.manual_seed(0)
    model = create_model("sfp_resnet20", num_classes=10)
    randomize_bn(model)
    SoftFilterPruning(prune_ratio=0.3).prune(model.eval(), path=str(tmp_path / "sfp.pt"))
    path = tmp_path / "sfp-masked.pt"
    assert load_artifact(path).masks
    return path


# ---- fine-tune vs. scratch ----------------------------------------------------------------------

def test_finetune_starts_from_exactly_the_artifact_weights(l1_artifact: Path) -> None:
    art = load_artifact(l1_artifact)
    module = ImageClassifier(artifact=str(l1_artifact), regime="finetune")
    state = module.model.state_dict()
    assert state.keys() == art.state_dict.keys()
    for k, v in art.state_dict.items():
        assert torch.equal(state[k], v), k
    assert module.model.arch_kwargs()["cfg"] == art.architecture.kwargs["cfg"] == [8] * 3 + [16] * 3 + [32] * 3


def test_scratch_has_the_pruned_shapes_and_none_of_the_weights(l1_artifact: Path) -> None:
    art = load_artifact(l1_artifact)
    pl.seed_everything(1)
    module = ImageClassifier(artifact=str(l1_artifact), regime="scratch")
    params = dict(module.model.named_parameters())
    assert len(params) > 0
    for name, p in params.items():
        ref = art.state_dict[name]
        assert p.shape == ref.shape, name
        assert not torch.equal(p.detach(), ref), f"{name} was inherited from the artifact"
    assert module.model.arch_kwargs()["cfg"] == art.architecture.kwargs["cfg"]
    # the fresh weights are the family's own init (BN gamma 1, beta 0), drawn from the seeded RNG
    assert torch.equal(module.model.layer1[0].bn1.weight, torch.ones(8))
    pl.seed_everything(1)
    again = ImageClassifier(artifact=str(l1_artifact), regime="scratch")
    assert all(torch.equal(p, again.model.get_parameter(n)) for n, p in params.items())


def test_scratch_keeps_the_channel_selection_indices(slim_artifact: Path) -> None:
    art = load_artifact(slim_artifact)
    select = art.architecture.kwargs["select"]
    assert any(s and len(s) < n for s, n in zip(select, [64, 128, 256, 256], strict=True)), select
    finetune = ImageClassifier(artifact=str(slim_artifact), regime="finetune")
    scratch = ImageClassifier(artifact=str(slim_artifact), regime="scratch")
    sel_ft = {n: m.indices for n, m in finetune.model.named_modules() if isinstance(m, ChannelSelection)}
    sel_sc = {n: m.indices for n, m in scratch.model.named_modules() if isinstance(m, ChannelSelection)}
    assert sel_ft.keys() == sel_sc.keys() and len(sel_sc) == 4
    for name, idx in sel_sc.items():
        assert torch.equal(idx, art.state_dict[f"{name}.indices"]), name
        assert torch.equal(idx, sel_ft[name])
    for name, p in scratch.model.named_parameters():
        assert p.shape == art.state_dict[name].shape
        assert not torch.equal(p.detach(), art.state_dict[name]), name
    x = torch.randn(2, 3, 32, 32)
    assert scratch.eval()(x).shape == (2, 10)


# ---- masks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["masked", "sfp"])
@pytest.mark.parametrize("regime", ["finetune", "scratch"])
def test_masked_weights_stay_zero_through_training(kind, regime, request, tmp_path: Path, tiny_data) -> None:
    path = request.getfixturevalue(f"{kind}_artifact")
    art = load_artifact(path)
    pl.seed_everything(0)
    module = ImageClassifier(artifact=str(path), regime=regime, lr=0.1, weight_decay=5e-4)
    masks = art.masks
    assert module.masks.keys() == masks.keys() and len(masks) >= 19  # every conv of ResNet-20
    before = _params(module)
    for name, mask in masks.items():
        assert not before[name][~mask.expand_as(before[name])].any(), f"{name} starts with masked non-zeros"
    if regime == "finetune":
        assert all(torch.equal(before[k], art.state_dict[k]) for k in before)

    _fit(module, tiny_data, tmp_path, epochs=2)  # 6 SGD steps with momentum and weight decay
    after = _params(module)
    for name, mask in masks.items():
        full = mask.expand_as(after[name])
        assert not after[name][~full].any(), f"{name}: a masked weight moved ({regime}, {kind})"
        assert not torch.equal(after[name][full], before[name][full]), f"{name}: kept weights did not train"
    # the optimizer's momentum is zero where the mask is
    opt = module.trainer.optimizers[0]
    for name, p in module.model.named_parameters():
        if name in masks:
            buf = opt.state[p]["momentum_buffer"]
            assert not buf[~masks[name].expand_as(buf)].any()


def test_scratch_masked_convs_use_density_corrected_he_init(masked_artifact: Path) -> None:
    art = load_artifact(masked_artifact)
    pl.seed_everything(0)
    module = ImageClassifier(artifact=str(masked_artifact), regime="scratch")
    conv = module.model.layer3[2].conv2  # 64 -> 64, 3x3: 36,864 weights, ~9,200 kept
    mask = art.masks["layer3.2.conv2.weight"]
    w = conv.weight.detach()
    assert torch.equal(w != 0, mask)  # fresh values everywhere the mask keeps, zero elsewhere
    assert not torch.equal(w, art.state_dict["layer3.2.conv2.weight"])
    nnz = int(mask.sum())
    corrected = math.sqrt(2.0 / (nnz / conv.in_channels))  # n = nnz / C_in (spec 1.5), = 0.118 here
    plain = math.sqrt(2.0 / (9 * conv.out_channels))  # the uncorrected fan-out, = 0.059
    std = float(w[mask].std())
    assert std == pytest.approx(corrected, rel=0.05)
    assert abs(std - plain) > 0.5 * plain
    # an unmasked layer (none here) would keep the family's init: the classifier is untouched by masks
    assert "fc.weight" not in art.masks


# ---- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["masked", "slim"])
def test_checkpoint_records_regime_and_rebuilds_without_the_artifact(kind, request, tmp_path: Path,
                                                                      tiny_data) -> None:
    path: Path = request.getfixturevalue(f"{kind}_artifact")
    art = load_artifact(path)
    pl.seed_everything(0)
    module = ImageClassifier(artifact=str(path), regime="scratch", lr=0.05)
    trainer = _fit(module, tiny_data, tmp_path / "run")
    ckpt = Path(trainer.checkpoint_callback.last_model_path)
    assert ckpt.name == "last.ckpt" and ckpt.is_file()

    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    hp = raw["hyper_parameters"]
    assert hp["regime"] == "scratch" and hp["source_artifact"] == str(path) and hp["artifact"] is None
    assert hp["arch"] == art.architecture.name
    assert hp["cfg"] == art.architecture.kwargs["cfg"]

    path.unlink()  # the checkpoint alone must describe the pruned model
    loaded = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    trained = module.model.state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(state[k], v), k
    assert loaded.masks.keys() == module.masks.keys()
    assert all(torch.equal(loaded.masks[k], module.masks[k]) for k in module.masks)
    if kind == "slim":
        assert loaded.model.arch_kwargs() == module.model.arch_kwargs()
        assert loaded.model.arch_kwargs()["select"] == art.architecture.kwargs["select"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), module.eval()(x))


# ---- bad input ----------------------------------------------------------------------------------

def test_artifact_for_another_class_count_is_refused(l1_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"10 classes.*has 5"):
        ImageClassifier(artifact=str(l1_artifact), num_classes=5)
    # a model built without an explicit num_classes has its builder's default (10) all the same
    implicit = tmp_path / "implicit.pt"
    L1FilterPruning(prune_ratio=0.5).prune(create_model("cifar_resnet20").eval(), path=str(implicit))
    assert "num_classes" not in load_artifact(implicit).architecture.kwargs
    with pytest.raises(ValueError, match=r"10 classes.*has 100"):
        ImageClassifier(artifact=str(implicit), num_classes=100)
    assert ImageClassifier(artifact=str(implicit), num_classes=10).model.fc.out_features == 10


def test_arch_mismatch_is_refused(l1_artifact: Path) -> None:
    with pytest.raises(ValueError, match=r"cifar_resnet56.*cifar_resnet20"):
        ImageClassifier(arch="cifar_resnet56", artifact=str(l1_artifact))
    # the arch the artifact holds is accepted
    assert ImageClassifier(arch="cifar_resnet20", artifact=str(l1_artifact)).model.zoo_name == "cifar_resnet20"


def test_missing_and_corrupted_artifacts_are_refused(l1_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no pruned artifact"):
        ImageClassifier(artifact=str(tmp_path / "absent.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(l1_artifact.read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable lit-prune artifact"):
        ImageClassifier(artifact=str(truncated), regime="scratch")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a lit-prune artifact"):
        ImageClassifier(artifact=str(other))
    with pytest.raises(ValueError, match="regime"):
        ImageClassifier(artifact=str(l1_artifact), regime="scratch_b")


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_test_evaluates_an_artifact(tmp_path: Path, monkeypatch) -> None:
    """``python train.py test --config configs/quickstart.yaml --model.artifact X`` tests the pruned model."""
    from lit_prune.cli.train import main

    torch.manual_seed(0)
    model = create_model("cifar_vgg11", cfg=QUICKSTART_CFG, num_classes=10)
    randomize_bn(model)
    path = tmp_path / "vgg.pt"
    art = L1FilterPruning(prune_ratio=0.3).prune(model.eval(), path=str(path))
    monkeypatch.chdir(tmp_path)  # the config's TensorBoard logger writes to ./runs
    cli = main(["test", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.artifact", str(path),
                "--data.batch_size=16", "--trainer.limit_test_batches=3", "--trainer.enable_progress_bar=false"])
    acc = float(cli.trainer.callback_metrics["test/acc1"])
    assert cli.model.model.arch_kwargs()["cfg"] == art.architecture.kwargs["cfg"]

    # the same number by hand: the artifact as a plain nn.Module on the first three test batches
    dm = MNIST5kDataModule(batch_size=16)
    dm.setup("test")
    net = load_model(path)
    correct = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.test_dataloader()):
            if i == 3:
                break
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 48 and acc == pytest.approx(correct / total)
