"""Soft Filter Pruning: selection, soft regrowth, schedule, artifacts, resume, DDP and argument checks."""

from __future__ import annotations

import copy
import csv
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from callbacks import SoftFilterPruning
from lit_prune.artifact import load_artifact, load_model
from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups
from lit_prune.core.masks import apply_masks, group_masks, merge
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from lit_prune.sources import load_method
from tests.helpers import RandomImageDataModule, clean_env, randomize_bn, run_process

REPO = Path(__file__).resolve().parents[2]
# ResNet-20 convs: the stem (16), then two convs per block of 16/32/64 filters; 30% of each zeroed.
ZEROED_20 = {16: 4, 32: 9, 64: 19}
FULL_CFG20 = [16] * 3 + [32] * 3 + [64] * 3
SMALL_CFG20 = [12] * 3 + [23] * 3 + [45] * 3


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".bn" in k or k.startswith("bn")}


def _leaked(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Non-zero weights where a mask says zero."""
    params = dict(model.named_parameters())
    return sum(int(params[n].detach()[~m.expand_as(params[n])].count_nonzero()) for n, m in masks.items())


def _norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter: (C_out, ...) -> (C_out,)."""
    return weight.detach().flatten(1).norm(dim=1)


def _bn_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with the removable groups' BN gamma/beta zeroed too: what the small export computes."""
    out = copy.deepcopy(model).eval()
    sets = [group_masks(out, g, masks[f"{g.conv}.weight"].flatten(), zero_bn=True)
            for g in channel_groups(out) if f"{g.conv}.weight" in masks]
    apply_masks(out, merge(*sets))
    return out


class OrderedData(RandomImageDataModule):
    """The tiny random data without shuffling: a resumed run sees the batches an uninterrupted run sees."""

    def train_dataloader(self):
        return self._loader(False)


class Probe(SoftFilterPruning):
    """Records every re-prune: the weights just before it, what a fresh selection gives, the result."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.events: list[dict] = []
        self.val_runs = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_runs += 1

    def reprune(self, trainer, model, epoch=None) -> None:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        momentum_before = self._momentum(trainer, model)
        fresh = SoftFilterPruning.compute_masks(self, model)
        super().reprune(trainer, model, epoch)
        self.events.append({
            "epoch": self.last_prune_epoch, "step": self.last_prune_step, "val_runs": self.val_runs,
            "before": before, "fresh": fresh, "masks": dict(self.masks),
            "after": {n: p.detach().clone() for n, p in model.named_parameters()},
            "momentum_before": momentum_before, "momentum": self._momentum(trainer, model),
        })

    @staticmethod
    def _momentum(trainer, model) -> dict[str, torch.Tensor]:
        opt = trainer.optimizers[0] if trainer is not None and trainer.optimizers else None
        if opt is None:
            return {}
        return {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()
                if "momentum_buffer" in opt.state.get(p, {})}


def _trainer(tmp_path: Path, cb: pl.Callback, max_epochs: int, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2, limit_val_batches=1,
                    num_sanity_val_steps=0)
    return pl.Trainer(max_epochs=max_epochs, callbacks=[cb], **{**defaults, **kwargs})


def _module(lr: float = 0.1) -> ImageClassifier:
    return ImageClassifier(arch="sfp_resnet20", num_classes=10, lr=lr, weight_decay=5e-4, nesterov=True,
                           schedule="constant")


# ---- filter selection ----------------------------------------------------------------------------


def test_zeroes_the_lowest_l2_filters_of_every_conv_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = create_model("sfp_resnet20")
    randomize_bn(model)
    conv = model.layer2[1].conv1  # (32, 32, 3, 3)
    # filter j gets L2 norm norms[j]: a random unit direction scaled
    norms = torch.randperm(32, generator=torch.Generator().manual_seed(0)).float() + 1
    direction = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unit = direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        conv.weight.copy_(unit * norms.reshape(-1, 1, 1, 1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_before = _bn_state(model)

    cb = SoftFilterPruning(prune_ratio=0.3, artifact_path=None, masked_artifact_path=None)
    masks = cb.pruner.compute_masks(model)
    widths = _conv_widths(model)
    assert list(masks) == [f"{n}.weight" for n in widths]  # every conv: stem and both convs of each block
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == (widths[name[:-7]], 1, 1, 1)
        assert int((~mask).sum()) == ZEROED_20[mask.shape[0]]
    # on the hand-set layer: exactly the 9 smallest norms
    zeroed = (~masks["layer2.1.conv1.weight"].flatten()).nonzero().flatten()
    assert zeroed.tolist() == norms.argsort()[:9].sort().values.tolist()
    # on the others: the zeroed filters are the lowest-norm ones
    for name, mask in masks.items():
        n = _norms(dict(model.named_parameters())[name])
        assert n[~mask.flatten()].max() <= n[mask.flatten()].min()

    cb.reprune(None, model)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in masks:
            keep = masks[name].flatten()
            assert torch.all(p[~keep] == 0)  # whole filters
            assert torch.equal(p[keep], before[name][keep])  # the rest untouched
        else:
            assert torch.equal(p, before[name]), name  # BN and fc untouched
    assert all(torch.equal(v, bn_before[k]) for k, v in _bn_state(model).items())  # running stats too


def test_layers_skip_and_criterion() -> None:
    torch.manual_seed(0)
    model = create_model("sfp_resnet20")
    masks = SoftFilterPruning(layers=["layer*"], skip=["*.conv2"]).compute_masks(model)
    assert list(masks) == [f"layer{s}.{b}.conv1.weight" for s in (1, 2, 3) for b in range(3)]

    w = model.layer1[0].conv1.weight  # (16, 16, 3, 3)
    with torch.no_grad():
        w.fill_(1.0)
        w[0].zero_()
        w[0, 0, 0, 0] = 3.0  # L1 3, L2 3
        w[1].zero_()
        w[1, :2, 0, 0] = 2.0  # L1 4, L2 2.83
    kwargs = {"prune_ratio": 0.1, "layers": ["layer1.0.conv1"]}  # int(16 * 0.1) = 1 filter
    assert (~SoftFilterPruning(**kwargs).compute_masks(model)["layer1.0.conv1.weight"]).nonzero()[:, 0].tolist() == [1]
    l1 = SoftFilterPruning(**kwargs, criterion="l1").compute_masks(model)["layer1.0.conv1.weight"]
    assert (~l1).nonzero()[:, 0].tolist() == [0]


# ---- soft pruning during training -----------------------------------------------------------------


def test_filters_regrow_between_reprunes_and_selection_is_recomputed(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    cb = Probe(prune_ratio=0.3, artifact_path=None, masked_artifact_path=None)
    module = _module()
    _trainer(tmp_path, cb, max_epochs=3, limit_train_batches=1).fit(module, datamodule=tiny_data)

    # once before training, then after each epoch, and before that epoch's validation
    assert [(e["epoch"], e["step"], e["val_runs"]) for e in cb.events] == [(0, 0, 0), (1, 1, 0), (2, 2, 1), (3, 3, 2)]
    assert not cb.events[0]["momentum"]  # fresh optimizer at the first prune
    changed = regrown = with_momentum = 0
    for prev, event in zip(cb.events, cb.events[1:]):
        for name, old in prev["masks"].items():
            zeroed = ~old.flatten()
            norms = _norms(event["before"][name])
            regrown += int((norms[zeroed] > 0).sum())
            # soft: zeroed filters are free to move; every one still carrying momentum did
            if name in prev["momentum"]:
                moving = prev["momentum"][name].flatten(1).abs().sum(1) > 0
                assert torch.all(norms[zeroed & moving] > 0), name
                with_momentum += int((zeroed & moving).sum())
            # the re-prune zeroed the new selection, whole filters, and nothing else
            new = event["masks"][name].flatten()
            assert torch.all(event["after"][name][~new] == 0)
            assert torch.equal(event["after"][name][new], event["before"][name][new])
            assert int((~new).sum()) == ZEROED_20[new.numel()]
            # the selection was ranked afresh on the regrown weights, not carried over
            assert torch.equal(event["masks"][name], event["fresh"][name])
            changed += int((old != event["masks"][name]).sum())
            # momentum is left alone, as in the reference code: zeroed filters keep their velocity
            assert torch.equal(event["momentum"][name], event["momentum_before"][name])
        for name in event["before"]:
            if name not in event["masks"]:
                assert torch.equal(event["before"][name], event["after"][name])  # BN and fc untouched
    assert regrown > 0 and with_momentum > 0 and changed > 0  # filters came back, and the selection moved
    # the reference's quirk, kept: zeroed before the first step behind BN (beta 0) + ReLU, with no momentum,
    # a filter gets no gradient at all, so the first selection of the stem and block conv1s is final
    for name, first in cb.events[0]["masks"].items():
        if not name.endswith("conv2.weight"):
            assert all(torch.equal(e["masks"][name], first) for e in cb.events), name
    # the trained model ends with the last selection's zeros
    assert _leaked(module.model, cb.masks) == 0


def test_interval_and_last_epoch_and_logged_sparsity(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    cb = Probe(prune_ratio=0.3, interval=2, artifact_path=None, masked_artifact_path=None)
    logger = CSVLogger(tmp_path, name="csv")
    _trainer(tmp_path, cb, max_epochs=3, limit_train_batches=1, limit_val_batches=0, logger=logger).fit(
        _module(), datamodule=tiny_data)
    # before training, after epoch 2 (the interval), after epoch 3 (the last); not after epoch 1
    assert [(e["epoch"], e["step"]) for e in cb.events] == [(0, 0), (2, 2), (3, 3)]
    assert cb.state_dict()["schedule"]["last_prune_epoch"] == 3

    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/sparsity")]
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    # ResNet-20: 16 + 6*16 + 6*32 + 6*64 = 688 filters, 4 + 6*4 + 6*9 + 6*19 = 196 zeroed
    assert float(rows[0]["prune/sparsity"]) == pytest.approx(196 / 688)
    assert float(rows[0]["prune/zeroed/conv1"]) == 4 and float(rows[0]["prune/zeroed/layer3.2.conv2"]) == 19
    changes = sum(int((cb.events[0]["masks"][k] != m).sum()) for k, m in cb.events[1]["masks"].items())
    assert rows[0].get("prune/mask_changes", "") == "" and float(rows[1]["prune/mask_changes"]) == changes


# ---- artifacts ----------------------------------------------------------------------------------


def test_end_of_training_writes_masked_and_small_artifacts(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    cb = SoftFilterPruning(prune_ratio=0.3)
    module = _module(lr=0.05)
    trainer = _trainer(tmp_path, cb, max_epochs=2)
    trainer.fit(module, datamodule=tiny_data)
    trained = module.model.eval()
    log_dir = Path(trainer.log_dir)

    # (1) the paper's model: full size, zero filters, masks of every conv
    masked_path, small_path = log_dir / "sfp-masked.pt", log_dir / "pruned.pt"
    assert cb.masked_written == str(masked_path) and cb.written == str(small_path)
    masked = torch.load(masked_path, weights_only=True)
    assert masked["architecture"]["kwargs"]["cfg"] == FULL_CFG20
    assert masked["provenance"]["method"] == "sfp" and masked["provenance"]["settings"]["prune_ratio"] == 0.3
    assert "last_prune_epoch" not in masked["provenance"]["settings"]
    assert set(masked["masks"]) == {f"{n}.weight" for n in _conv_widths(trained)}
    for name, m in masked["masks"].items():
        assert torch.equal(m, cb.masks[name])
        assert torch.all(masked["state_dict"][name][~m.flatten()] == 0)
    dense = count_flops(create_model("sfp_resnet20"))
    assert masked["flops"]["dense"]["macs"] == dense.macs
    assert masked["flops"]["pruned"]["macs"] == count_flops(trained, nonzero=True).macs < dense.macs

    # (2) the physically smaller model: block conv1s shrunk, the stem and conv2s keep their masks
    small = torch.load(small_path, weights_only=True)
    assert small["architecture"]["kwargs"]["cfg"] == SMALL_CFG20
    assert set(small["masks"]) == {"conv1.weight"} | {f"layer{s}.{b}.conv2.weight" for s in (1, 2, 3) for b in range(3)}
    assert small["flops"]["pruned"]["macs"] < masked["flops"]["pruned"]["macs"] < dense.macs
    assert small["flops"]["dense"]["macs"] == dense.macs

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        # the masked artifact is the trained model itself
        torch.testing.assert_close(load_model(masked_path)(x), trained(x))
        # the small artifact is its BN-masked variant (gamma/beta of the removed channels zeroed too); in
        # this from-scratch run those betas never left 0, the random-BN test below shows the difference
        torch.testing.assert_close(load_model(small_path)(x), _bn_masked(trained, cb.masks)(x), rtol=1e-4, atol=1e-5)


def test_small_export_equals_bn_masked_variant_with_random_bn(tmp_path: Path) -> None:
    """The same equality without a Trainer, with random BN statistics (trained ones are near identity)."""
    torch.manual_seed(0)
    model = create_model("sfp_resnet20").eval()
    randomize_bn(model)
    cb = SoftFilterPruning(prune_ratio=0.5)
    art = cb.prune(model, path=str(tmp_path / "small.pt"))  # the lit_prune.prune CLI path
    assert art.architecture.kwargs["cfg"] == [8] * 3 + [16] * 3 + [32] * 3
    assert (tmp_path / "sfp-masked.pt").is_file() and load_artifact(tmp_path / "small.pt") is not None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "small.pt")(x), _bn_masked(model, cb.masks)(x),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "sfp-masked.pt")(x), model(x))
        # with non-zero betas the two differ: SFP leaves the BN of zeroed filters in place
        assert not torch.allclose(load_model(tmp_path / "small.pt")(x), model(x), atol=1e-3)


def test_masked_artifact_starts_scratch_with_enforced_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("sfp_resnet20")
    cb = SoftFilterPruning(artifact_path=None, masked_artifact_path=str(tmp_path / "m.pt"))
    cb.prune(model)
    scratch = ImageClassifier(artifact=str(tmp_path / "m.pt"), regime="scratch", num_classes=10)
    assert set(scratch.masks) == set(cb.masks) and _leaked(scratch.model, cb.masks) == 0
    kept = cb.masks["layer1.0.conv1.weight"].flatten()
    assert not torch.equal(scratch.model.layer1[0].conv1.weight[kept], model.layer1[0].conv1.weight[kept])


def test_a_model_no_file_can_rebuild_is_refused_before_training_or_pruned_without_artifacts(
    tmp_path: Path, tiny_data
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(10, 10))
    trainer = _trainer(tmp_path, SoftFilterPruning(prune_ratio=0.5), max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match=r"cannot be written as a pruned artifact.*rebuildable"):
        trainer.fit(ImageClassifier(model=net, num_classes=10, lr=0.1), datamodule=tiny_data)
    assert trainer.global_step == 0
    cb = SoftFilterPruning(prune_ratio=0.5, artifact_path=None, masked_artifact_path=None)
    trainer = _trainer(tmp_path, cb, max_epochs=1, limit_train_batches=1)
    trainer.fit(ImageClassifier(model=net, num_classes=10, lr=0.1), datamodule=tiny_data)
    assert list(cb.masks) == ["0.weight"] and int((~cb.masks["0.weight"]).sum()) == 5
    assert _leaked(net, cb.masks) == 0
    assert not list(tmp_path.rglob("*.pt")) and cb.written is None and cb.masked_written is None
    with pytest.raises(ValueError, match="rebuildable"):
        cb.prune(net, path=str(tmp_path / "sfp.pt"))


# ---- resume ---------------------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: Path | None = None) -> tuple[ImageClassifier, SoftFilterPruning, pl.Trainer]:
        pl.seed_everything(0)
        cb = SoftFilterPruning(prune_ratio=0.3, artifact_path=None, masked_artifact_path=None)
        module = _module()
        trainer = _trainer(tmp_path, cb, max_epochs=max_epochs, deterministic=True)
        trainer.fit(module, datamodule=OrderedData(), ckpt_path=ckpt)
        return module, cb, trainer

    full, cb_full, _ = run(2)
    half, cb_half, trainer = run(1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][cb_half.state_key]
    assert state["schedule"]["last_prune_epoch"] == 1 and state["schedule"]["last_prune_step"] == 2
    assert all(torch.equal(state["masks"][k], m) for k, m in cb_half.masks.items())

    resumed, cb_resumed, _ = run(2, ckpt)
    assert cb_resumed.last_prune_epoch == cb_full.last_prune_epoch == 2
    assert cb_resumed.masks.keys() == cb_full.masks.keys()
    assert all(torch.equal(cb_resumed.masks[k], m) for k, m in cb_full.masks.items())
    # the second epoch changed the selection, so equality above is not just the checkpoint's masks
    assert any(not torch.equal(cb_half.masks[k], m) for k, m in cb_full.masks.items())
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ---- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_ratio": 1.0}, r"prune_ratio must be a fraction removed in \[0, 1\).*rate 0.7 mean prune_ratio 0.3"),
        ({"prune_ratio": -0.1}, r"\[0, 1\)"),
        ({"interval": 0}, "interval must be a positive number of epochs"),
        ({"interval": 1.5}, "interval must be a positive number of epochs"),
        ({"criterion": "l3"}, "unknown criterion 'l3'"),
        ({"criterion": "bn_gamma"}, "'bn_gamma' does not score conv filters"),
        ({"layers": []}, "layers is empty"),
        ({"layers": "conv1"}, "lists of patterns"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SoftFilterPruning(**kwargs)


def test_unknown_patterns_are_refused_before_training(tmp_path: Path, tiny_data) -> None:
    model = create_model("sfp_resnet20")
    with pytest.raises(ValueError, match=r"layers pattern 'layer4\.\*' matches no prunable layer; .*conv1"):
        SoftFilterPruning(layers=["layer4.*"]).compute_masks(model)
    with pytest.raises(ValueError, match="skip pattern 'fc' matches no prunable layer"):
        SoftFilterPruning(skip=["fc"]).compute_masks(model)  # the classifier is never an SFP layer
    with pytest.raises(ValueError, match="leaves no conv to prune"):
        SoftFilterPruning(skip=["*"]).compute_masks(model)
    # through a Trainer: the error comes at fit start, before any step
    cb = Probe(layers=["layer9.*"])
    module = _module()
    w = module.model.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match="layer9"):
        _trainer(tmp_path, cb, max_epochs=1).fit(module, datamodule=tiny_data)
    assert not cb.events and torch.equal(module.model.conv1.weight, w)


# ---- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_method_configs(depth: int) -> None:
    path = REPO / "configs" / "methods" / f"sfp_resnet{depth}.yaml"
    first = path.read_text().splitlines()[0]
    assert first == f"# base: configs/cifar/sfp_resnet{depth}.yaml" and (REPO / first[len("# base: "):]).is_file()
    cb = load_method(path)
    assert isinstance(cb, SoftFilterPruning) and cb.pruner.prune_ratio == 0.3 and cb.interval == 1
    assert cb.pruner.layers == ["*"] and cb.pruner.criterion == "l2"
    base = yaml.safe_load((REPO / first[len("# base: "):]).read_text())
    assert base["model"]["arch"] == f"sfp_resnet{depth}"
    # the paper's masked set (mask_index): every conv weight, 6n + 3 of them for depth 6n + 2
    assert len(cb.pruner.compute_masks(create_model(f"sfp_resnet{depth}"))) == depth - 1


# ---- DDP (2 CPU processes, gloo) -----------------------------------------------------------------

PROBE = '''
"""Test-only SFP callback: rank 1 proposes other filters; every rank records what it ends up with."""
import os

import torch

from callbacks import SoftFilterPruning


class ProbeSFP(SoftFilterPruning):
    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.history = []

    def compute_masks(self, model):
        masks = super().compute_masks(model)
        if self._rank != 0:  # a rank-dependent proposal: the broadcast must override it
            masks = {k: v.roll(1, 0) for k, v in masks.items()}
        self.proposals = getattr(self, "proposals", []) + [masks]
        return masks

    def reprune(self, trainer, model, epoch=None):
        super().reprune(trainer, model, epoch)
        self.history.append({"epoch": self.last_prune_epoch, "masks": dict(self.masks)})

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        params = dict(pl_module.model.named_parameters())
        leaked = sum(int(params[n].detach()[~m.expand_as(params[n])].count_nonzero()) for n, m in self.masks.items())
        torch.save({"history": self.history, "proposals": self.proposals, "leaked": leaked,
                    "final": dict(self.masks)},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))

    def on_fit_start(self, trainer, pl_module):
        self._rank = trainer.global_rank
        super().on_fit_start(trainer, pl_module)
'''


def test_ddp_two_processes_agree_on_masks_and_write_one_pair(tmp_path: Path) -> None:
    (tmp_path / "sfp_probe.py").write_text(PROBE)
    out, run = tmp_path / "probe", tmp_path / "run"
    out.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          max_epochs: 2
          limit_train_batches: 2
          limit_val_batches: 1
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          callbacks:
            - class_path: sfp_probe.ProbeSFP
              init_args:
                out_dir: {out}
                prune_ratio: 0.3
        model:
          arch: sfp_resnet20
          lr: 0.1
          nesterov: true
        data:
          class_path: datamodules.MNIST5kDataModule
          init_args:
            batch_size: 16
        """))
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--trainer.accelerator", "cpu",
           "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    run_process(cmd, tmp_path, clean_env(tmp_path))

    assert sorted(p.name for p in run.rglob("*.pt")) == ["pruned.pt", "sfp-masked.pt"]
    assert not list(run.rglob("*.tmp"))
    r0, r1 = (torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    # before training, after epoch 1, after epoch 2: three re-prunes on each rank
    assert [h["epoch"] for h in r0["history"]] == [h["epoch"] for h in r1["history"]] == [0, 1, 2]
    # rank 1 proposed other filters every time, yet both ranks hold rank 0's selection
    for p0, p1, h0, h1 in zip(r0["proposals"], r1["proposals"], r0["history"], r1["history"]):
        assert any(not torch.equal(p0[k], p1[k]) for k in p0)
        assert all(torch.equal(h0["masks"][k], p0[k]) and torch.equal(h1["masks"][k], p0[k]) for k in p0)
    assert r0["leaked"] == r1["leaked"] == 0
    # the artifacts carry that selection
    masked = load_artifact(next(run.rglob("sfp-masked.pt")))
    assert all(torch.equal(masked.masks[k], m) for k, m in r0["final"].items())
    small = load_artifact(next(run.rglob("pruned.pt")))
    assert small.architecture.kwargs["cfg"] == SMALL_CFG20

