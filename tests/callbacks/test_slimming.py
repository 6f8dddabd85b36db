"""Network Slimming: the sparsity subgradient, the global threshold, exact export, Trainer and DDP runs."""

from __future__ import annotations

import copy
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from callbacks import NetworkSlimming
from lit_prune.artifact import load_artifact, load_model
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import apply_masks
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from lit_prune.sources import load_method
from tests.helpers import RandomImageDataModule, clean_env, masks_from_keeps, randomize_bn, run_process

REPO = Path(__file__).resolve().parents[2]
M = "M"
CFG8 = [8, M, 8, M, 16, 16, M, 16, 16, M, 16, 16]  # slim_vgg11, widths 8-16
CFG4 = [4, M, 4, M, 4, 4, M, 4, 4, M, 4, 4]  # slim_vgg11, 8 layers x 4 channels
TINY = {
    "vgg": ("slim_vgg11", {"cfg": CFG8}),
    "preresnet": ("slim_preresnet", {"depth": 11}),
    "densenet": ("slim_densenet", {"depth": 10, "growth": 4}),
}
PROBE_ENV = "LIT_PRUNE_SLIMMING_PROBE"


def _bn_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


# ---- the sparsity subgradient --------------------------------------------------------------------


class GradRecorder(pl.Callback):
    """Placed after NetworkSlimming: records the BN gamma grads the optimizer is about to use."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.gammas: list[dict[str, torch.Tensor]] = []
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bns = _bn_weights(pl_module.model)
        self.grads.append({n: p.grad.detach().clone() for n, p in bns.items()})
        self.gammas.append({n: p.detach().clone() for n, p in bns.items()})


def _one_accumulated_step(cb: NetworkSlimming | None, precision: str) -> GradRecorder:
    """One optimizer step over 2 accumulated batches of slim_vgg11, gammas with both signs and a zero."""
    pl.seed_everything(0)
    module = ImageClassifier(arch="slim_vgg11", cfg=CFG8, num_classes=10)
    with torch.no_grad():
        for p in _bn_weights(module.model).values():
            p.copy_(torch.randn(p.shape))
            p[0] = 0.0  # sign(0) = 0: no push
    plugins = []
    if precision == "16-mixed-scaled":
        # fp16 autocast with a real GradScaler on CPU: the grads are scaled by 1024 until Lightning unscales them
        from pytorch_lightning.plugins.precision import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]
    rec = GradRecorder()
    trainer = pl.Trainer(
        max_steps=1, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False, plugins=plugins,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=([cb] if cb is not None else []) + [rec],
    )  # fmt: skip
    trainer.fit(module, datamodule=RandomImageDataModule(num_samples=64, batch_size=16))
    return rec


@pytest.mark.parametrize("precision", ["32", "16-mixed-scaled"])
def test_sparsity_adds_s_sign_gamma_once_per_accumulated_step(precision: str) -> None:
    s = 1e-2
    plain = _one_accumulated_step(None, precision)
    slim = _one_accumulated_step(NetworkSlimming(sparsity=s, prune_at_end=False, artifact_path=None), precision)
    # two batches, one optimizer step, one call of the hook
    assert plain.batches == slim.batches == 2
    assert len(plain.grads) == len(slim.grads) == 1
    for name, g in slim.grads[0].items():
        gamma = slim.gammas[0][name]
        assert torch.equal(gamma, plain.gammas[0][name])  # same weights, same batches
        assert (gamma < 0).any() and (gamma > 0).any() and (gamma == 0).any()
        # exactly s * sign(gamma): not twice (per batch), not scaled by the AMP loss scale
        torch.testing.assert_close(g - plain.grads[0][name], s * torch.sign(gamma), rtol=0, atol=1e-6)


class _AnyModel(pl.LightningModule):
    """A user model: no zoo class, no ``model`` attribute, BN2d and BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5)
        )
        self.frozen = nn.BatchNorm2d(3)


def test_sparsity_works_on_any_module_and_bn1d_is_opt_in() -> None:
    model = _AnyModel()
    bn2, bn1, frozen = model.net[1], model.net[5], model.frozen
    with torch.no_grad():
        bn2.weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0]))
        bn1.weight.copy_(torch.tensor([-1.0, 1.0, 0.0, 3.0, -0.1]))
    for include, bn1_added in ((False, 0.0), (True, 1.0)):
        bn2.weight.grad = torch.full((4,), 0.25)
        bn1.weight.grad = torch.full((5,), 0.25)
        frozen.weight.grad = None  # e.g. a frozen layer: skipped, not turned into a zero grad
        NetworkSlimming(sparsity=0.1, include_bn1d=include).on_before_optimizer_step(None, model, None)
        torch.testing.assert_close(bn2.weight.grad, torch.tensor([0.35, 0.15, 0.25, 0.35]))
        torch.testing.assert_close(bn1.weight.grad, 0.25 + bn1_added * 0.1 * torch.sign(bn1.weight.detach()))
        assert frozen.weight.grad is None
        assert bn2.bias.grad is None  # beta is not regularised


def test_prune_at_end_needs_channel_groups_and_says_so_before_training() -> None:
    trainer = SimpleNamespace()
    with pytest.raises(ValueError, match="prune_at_end: false"):
        NetworkSlimming().setup(trainer, _AnyModel(), "fit")
    NetworkSlimming(prune_at_end=False).setup(trainer, _AnyModel(), "fit")  # sparsity-only training is fine


# ---- selection: one global threshold -------------------------------------------------------------

GAMMAS = [
    [0.1, 0.9, 0.3, 0.3],
    [0.3, -0.8, 0.05, 0.7],
    [0.2, 0.2, 0.2, 0.6],
    [0.3, 0.4, 0.5, 0.6],
    *[[0.3, 0.9, 0.9, 0.9]] * 4,
]


def _vgg_with_gammas(gammas: list[list[float]]) -> nn.Module:
    model = create_model("slim_vgg11", cfg=CFG4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn, g in zip(bns, gammas, strict=True):
            bn.weight.copy_(torch.tensor(g))
    return model


def test_global_threshold_prunes_ties_at_the_threshold() -> None:
    # 32 channels, prune_ratio 0.25: thr = sorted(|gamma|)[8] = 0.3; 5 values lie below it and 8 equal it,
    # so 13 go (more than 8): a channel survives only if strictly greater. |-0.8| counts as 0.8.
    keeps = NetworkSlimming(prune_ratio=0.25).select(_vgg_with_gammas(GAMMAS))
    expected = [[0, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1], [0, 1, 1, 1], *[[0, 1, 1, 1]] * 4]
    assert list(keeps) == ["features.0", "features.4", "features.8", "features.11", "features.15",
                           "features.18", "features.22", "features.25"]  # fmt: skip
    assert [k.int().tolist() for k in keeps.values()] == expected


def test_a_layer_losing_everything_raises_unless_floor() -> None:
    gammas = [list(g) for g in GAMMAS]
    gammas[2] = [0.2, 0.2, 0.25, 0.2]  # all below the threshold (still 0.3)
    model = _vgg_with_gammas(gammas)
    with pytest.raises(ValueError, match=r"'features\.8'.*floor: 1"):
        NetworkSlimming(prune_ratio=0.25).select(model)
    keeps = NetworkSlimming(prune_ratio=0.25, floor=1).select(model)
    assert keeps["features.8"].int().tolist() == [0, 0, 1, 0]  # its strongest channel
    assert keeps["features.0"].int().tolist() == [0, 1, 0, 0]  # the others follow the global threshold
    # floor 2 tops up a layer that kept one channel with its best other one (ties: the later index, as top_k)
    assert NetworkSlimming(prune_ratio=0.25, floor=2).select(model)["features.0"].int().tolist() == [0, 1, 0, 1]


def _preresnet_with(small: str, seed: int = 0) -> nn.Module:
    """PreResNet-11 with |gamma| in [1, 2) except BN ``small``, whose gammas are tiny."""
    torch.manual_seed(seed)
    model = create_model("slim_preresnet", depth=11).eval()
    randomize_bn(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_((torch.rand(m.num_features) + 1) * torch.sign(m.weight))
        bn = model.get_submodule(small)
        bn.weight.copy_(torch.rand(bn.num_features) * 0.01)
    return model


def test_residual_branch_may_vanish_and_export_equals_masked(tmp_path: Path) -> None:
    model = _preresnet_with("layer2.0.bn2")  # conv1's 32 outputs of block layer2.0 are the weakest
    cb = NetworkSlimming(prune_ratio=0.05, artifact_path=str(tmp_path / "p.pt"))
    keeps = cb.select(model)
    assert not keeps["layer2.0.conv1"].any()
    art = cb.prune(model)
    cfg = art.architecture.kwargs["cfg"]
    assert cfg[3:6] == [0, 0, 0] and all(w > 0 for w in cfg[:3] + cfg[6:])
    masked = copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, keeps))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "p.pt")(x), masked(x), rtol=1e-4, atol=1e-5)


def test_a_selection_cannot_vanish_floor_keeps_its_top_channel() -> None:
    model = _preresnet_with("layer2.0.bn1")  # the block's view of the stream
    with pytest.raises(ValueError, match=r"'layer2\.0\.select'.*floor: 1"):
        NetworkSlimming(prune_ratio=0.1).select(model)
    cb = NetworkSlimming(prune_ratio=0.1, floor=1, artifact_path=None)
    keep = cb.select(model)["layer2.0.select"]
    top = int(model.layer2[0].bn1.weight.abs().argmax())
    assert keep.nonzero().flatten().tolist() == [top]
    art = cb.prune(model)
    assert art.architecture.kwargs["select"][1] == [top]


def test_bn1d_groups_are_scored_only_with_include_bn1d() -> None:
    torch.manual_seed(0)
    model = create_model("slim_vgg11_bn", cfg=[8, M, 8, M, 8, 8, M, 8, 8, M, 8, 8, M, 16, 16], num_classes=10)
    randomize_bn(model)
    assert "classifier.0" not in NetworkSlimming(prune_ratio=0.5).select(model)
    keeps = NetworkSlimming(prune_ratio=0.5, include_bn1d=True).select(model)
    assert {"classifier.0", "classifier.3"} <= set(keeps)
    assert sum(int((~k).sum()) for k in keeps.values()) == int(96 * 0.5)  # one threshold over all 96


# ---- export: the masked model equals the physically pruned one ------------------------------------


@pytest.mark.parametrize("family", sorted(TINY))
def test_export_equals_masked_model_and_reloads(family: str, tmp_path: Path) -> None:
    name, kwargs = TINY[family]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    randomize_bn(model)  # signed gammas, non-trivial running stats and betas
    path = tmp_path / "pruned.pt"
    cb = NetworkSlimming(prune_ratio=0.5, artifact_path=str(path), threshold="reference")
    keeps = cb.select(model)
    art = cb.prune(model)

    total = sum(k.numel() for k in keeps.values())
    assert sum(int((~k).sum()) for k in keeps.values()) == int(total * 0.5) + 1  # the reference's rule: k + 1 go
    assert all(k.any() for k in keeps.values())

    masked = copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, keeps))
    raw = torch.load(path, weights_only=True)
    assert raw["provenance"]["method"] == "network_slimming"
    assert raw["provenance"]["settings"]["prune_ratio"] == 0.5
    pruned = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = masked(x)
        torch.testing.assert_close(pruned(x), out, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out, model(x), atol=1e-3)  # pruning did change the function
    assert art.architecture.to_dict() == raw["architecture"]

    # widths and channel-selection indices in the exported model are the kept channels
    for g in channel_groups(model):
        if g.name not in keeps:
            continue
        keep = keeps[g.name]
        if g.selection is not None:
            assert pruned.get_submodule(g.selection).indices.tolist() == keep.nonzero().flatten().tolist()
        else:
            assert group_size(pruned, g) == int(keep.sum())


# ---- a real Trainer run --------------------------------------------------------------------------


def test_fit_logs_histograms_and_bn_l1_and_writes_artifact(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    module = ImageClassifier(arch="slim_vgg11", cfg=CFG8, num_classes=10, lr=0.05)
    cb = NetworkSlimming(sparsity=1e-3, prune_ratio=0.5, histogram_every_n_epochs=2)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
        devices=1, logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=RandomImageDataModule(num_samples=32, batch_size=16))

    path = Path(trainer.log_dir) / "pruned.pt"
    assert path.is_file() and cb.written == str(path)
    art = load_artifact(path)
    keeps = cb.select(module.model)  # the live model was left full size
    widths = [int(k.sum()) for k in keeps.values()]
    assert [w for w in art.architecture.kwargs["cfg"] if w != M] == widths
    gammas = _bn_weights(module.model).values()
    l1 = sum(float(g.detach().abs().sum()) for g in gammas)
    assert float(trainer.callback_metrics["prune/bn_l1"]) == pytest.approx(l1, rel=1e-5)

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"bn_gamma/all", "bn_gamma/features.1", "bn_gamma/features.26"} <= set(tags["histograms"])
    assert len(events.Histograms("bn_gamma/all")) == 1  # every 2 epochs, over 2 epochs
    assert events.Histograms("bn_gamma/all")[0].histogram_value.num == sum(g.numel() for g in gammas)
    assert len(events.Scalars("prune/bn_l1")) == 2  # every epoch
    assert events.Scalars("prune/flops_ratio")[0].value == pytest.approx(art.flops.ratio)


def test_histograms_are_skipped_without_tensorboard(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = ImageClassifier(arch="slim_vgg11", cfg=CFG8, num_classes=10)
    cb = NetworkSlimming(prune_at_end=False)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", devices=1, logger=False,
        default_root_dir=tmp_path, callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=RandomImageDataModule(num_samples=16, batch_size=16))
    assert "prune/bn_l1" in trainer.callback_metrics
    assert cb.written is None and not list(tmp_path.rglob("*.pt"))


# ---- arguments and configs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"prune_ratio": -0.1}, "prune_ratio"),
        ({"sparsity": -1e-4}, "sparsity"),
        ({"sparsity": "1e-4"}, "sparsity"),
        ({"floor": -1}, "floor"),
        ({"histogram_every_n_epochs": -1}, "histogram_every_n_epochs"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NetworkSlimming(**kwargs)


# (file, base config, sparsity, prune_ratio, include_bn1d): docs/paper-settings.md §6.1 and 6.2 item 8
CONFIGS = [
    ("slimming_vgg19_70.yaml", "configs/cifar/slim_vgg19.yaml", 1e-4, 0.7, False),
    ("slimming_vgg19_50.yaml", "configs/cifar/slim_vgg19.yaml", 1e-4, 0.5, False),
    ("slimming_preresnet164_40.yaml", "configs/cifar/slim_preresnet164.yaml", 1e-5, 0.4, False),
    ("slimming_preresnet164_60.yaml", "configs/cifar/slim_preresnet164.yaml", 1e-5, 0.6, False),
    ("slimming_densenet40_40.yaml", "configs/cifar/slim_densenet40.yaml", 1e-5, 0.4, False),
    ("slimming_densenet40_60.yaml", "configs/cifar/slim_densenet40.yaml", 1e-5, 0.6, False),
    ("slimming_vgg11_bn_50.yaml", "configs/imagenet/slim_vgg11_bn.yaml", 1e-5, 0.5, True),
]


@pytest.mark.parametrize(("file", "base", "sparsity", "ratio", "bn1d"), CONFIGS)
def test_method_configs_match_the_paper(file: str, base: str, sparsity: float, ratio: float, bn1d: bool) -> None:
    path = REPO / "configs" / "methods" / file
    text = path.read_text()
    assert text.splitlines()[0] == f"# base: {base}" and (REPO / base).is_file()
    assert f"--config {base} --config configs/methods/{file}" in text
    cb = load_method(path)
    assert isinstance(cb, NetworkSlimming)
    m = cb.pruner
    assert (m.sparsity, m.prune_ratio, m.include_bn1d, m.floor) == (sparsity, ratio, bn1d, 0)


# ---- DDP (2 CPU processes, gloo), started as its own train.py process ------------------------------


class RankProbeSlimming(NetworkSlimming):
    """Test-only: each rank saves its *own* selection and gammas to ``$LIT_PRUNE_SLIMMING_PROBE``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank = trainer.global_rank
        super().on_train_end(trainer, pl_module)

    def decide(self, model: nn.Module, ctx):
        decision = super().decide(model, ctx)
        out = Path(os.environ[PROBE_ENV])
        gammas = {n: g.detach().cpu().clone() for n, g in _bn_weights(model).items()}
        torch.save({"keeps": decision.keeps, "gammas": gammas}, out / f"rank{self._rank}.pt")
        return decision


@pytest.mark.slow  # ~25 s: two processes, each importing torch and Lightning
def test_ddp_two_processes_select_identical_channels_and_write_one_artifact(tmp_path: Path) -> None:
    probe, run = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    config = tmp_path / "slimming.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        model:
          arch: slim_vgg11
          lr: 0.05
        data:
          class_path: datamodules.MNIST5kDataModule
          init_args: {{batch_size: 16, num_workers: 0}}
        trainer:
          max_epochs: 1
          limit_train_batches: 3
          limit_val_batches: 1
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          callbacks:
            - class_path: tests.callbacks.test_slimming.RankProbeSlimming
              init_args: {{sparsity: 1.0e-3, prune_ratio: 0.5}}
        """))
    cmd = [sys.executable, "train.py", "fit", "--config", str(config), "--model.cfg", str(CFG8),
           "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]  # fmt: skip
    run_process(cmd, REPO, clean_env(extra={PROBE_ENV: str(probe)}))

    artifacts = sorted(run.rglob("*.pt"))
    assert [p.name for p in artifacts] == ["pruned.pt"], artifacts
    assert not list(run.rglob("*.tmp"))
    art = load_artifact(artifacts[0])

    # each rank selected on its own (no broadcast yet) and got the same channels from the same gammas
    ranks = [torch.load(probe / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert ranks[0]["gammas"].keys() == ranks[1]["gammas"].keys()
    assert all(torch.equal(g, ranks[1]["gammas"][n]) for n, g in ranks[0]["gammas"].items())
    assert ranks[0]["keeps"].keys() == ranks[1]["keeps"].keys()
    assert all(torch.equal(k, ranks[1]["keeps"][n]) for n, k in ranks[0]["keeps"].items())
    widths = [int(k.sum()) for k in ranks[0]["keeps"].values()]
    assert [w for w in art.architecture.kwargs["cfg"] if w != M] == widths

    # and the artifact is the selection recomputed from the final checkpoint
    (ckpt,) = run.rglob("last.ckpt")
    trained = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").model
    keeps = NetworkSlimming(prune_ratio=0.5).select(trained)
    assert all(torch.equal(keeps[n], k) for n, k in ranks[0]["keeps"].items())
    expected = copy.deepcopy(trained).eval()
    apply_masks(expected, masks_from_keeps(expected, keeps))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(artifacts[0])(x), expected(x), rtol=1e-4, atol=1e-5)
