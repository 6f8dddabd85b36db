"""The contract every pruning callback keeps, checked once for all seven methods.

For each method, on a tiny CIFAR ResNet-20 trained for two epochs:

* a run stopped after one epoch and resumed from its checkpoint ends exactly as an uninterrupted run
  (same weights, same pruning state, same artifact);
* the artifact loads with ``torch.load(weights_only=True)``, rebuilds the pruned model, and records the
  constructor arguments as given (and nothing of the callback's state);
* masked weights stay zero through every step (momentum and weight decay would revive them);
* the checkpoint state is keyed by the callback's arguments, so two instances of one method keep theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune.artifact import load_artifact, load_model
from lit_prune.callbacks import (
    ChannelPruning,
    L1FilterPruning,
    MagnitudePruning,
    NetworkSlimming,
    PruningCallback,
    SoftFilterPruning,
    SparseStructureSelection,
    ThiNetPruning,
)
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.methods.base import Context, Decision, PruningMethod
from lit_prune.module import ImageClassifier
from tests.helpers import RandomImageDataModule

CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]


class _KeepEven(PruningMethod):
    """A new method as a user would add one: plain PyTorch, keeps the even-indexed channels of every group."""

    name = "keep_even"

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        groups = [g for g in channel_groups(model) if g.conv is not None]
        return Decision(keeps={g.name: torch.arange(group_size(model, g)) % 2 == 0 for g in groups})


class KeepEvenPruning(PruningCallback):
    """Its callback: the arguments, and when to prune. Resume, DDP and the artifact come with the base class."""

    def __init__(self, artifact_path: str | None = "pruned.pt") -> None:
        super().__init__(artifact_path)
        self.pruner = _KeepEven()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(pl_module.model, trainer=trainer)

#: name -> (callback factory, model kwargs)
METHODS: dict[str, tuple[Callable[[], PruningCallback], dict]] = {
    "l1": (lambda: L1FilterPruning(prune_ratio=0.5), {}),
    "l1_mask": (lambda: L1FilterPruning(prune_ratio=0.5, mode="mask", keep_init=True), {}),
    "slimming": (lambda: NetworkSlimming(sparsity=1e-3, prune_ratio=0.3, floor=1, histogram_every_n_epochs=0), {}),
    "sfp": (lambda: SoftFilterPruning(prune_ratio=0.3), {}),
    "magnitude": (lambda: MagnitudePruning(amount=0.6, start_epoch=0, end_epoch=1, keep_init=True), {}),
    "sss": (lambda: SparseStructureSelection(gamma=0.05), {"gates": True}),
    "thinet": (lambda: ThiNetPruning(prune_ratio=0.5, num_images=32, positions_per_image=4), {}),
    "channel_pruning": (lambda: ChannelPruning(prune_ratio=0.5, num_images=32, positions_per_image=4), {}),
    "new_method": (lambda: KeepEvenPruning(), {}),
}


class _OrderedData(RandomImageDataModule):
    """The tiny data in a fixed order, so a resumed run sees the batches an uninterrupted one sees."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


def _fit(root: Path, cb: PruningCallback, model_kwargs: dict, epochs: int, ckpt: Path | None = None):
    """Train for ``epochs`` (from ``ckpt`` if given), writing a checkpoint after every epoch."""
    pl.seed_everything(0)
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1, momentum=0.9,
                             weight_decay=5e-3, schedule="constant", model_kwargs=model_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
                         callbacks=[cb, ModelCheckpoint(dirpath=root / "ckpt", filename="e{epoch}",
                                                     auto_insert_metric_name=False, save_top_k=-1)],
                         enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                         deterministic=True)
    trainer.fit(module, datamodule=_OrderedData(num_samples=48, batch_size=16), ckpt_path=ckpt)
    return trainer, module


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_equals_an_uninterrupted_run_and_the_artifact_reloads(name: str, tmp_path: Path, isolated) -> None:
    factory, kwargs = METHODS[name]
    full_cb = factory()
    _, full = _fit(tmp_path / "full", full_cb, kwargs, epochs=2)

    ckpt = tmp_path / "full" / "ckpt" / "e0.ckpt"  # written after the first epoch, as a killed run leaves it
    saved = torch.load(ckpt, weights_only=True)  # the callback state is plain tensors and containers
    assert full_cb.state_key in saved["callbacks"]

    resumed_cb = factory()
    _, resumed = _fit(tmp_path / "resumed", resumed_cb, kwargs, epochs=2, ckpt=ckpt)

    assert _state_equal(resumed.model.state_dict(), full.model.state_dict()), f"{name}: weights differ after resume"
    assert _state_equal(resumed_cb.state_dict(), full_cb.state_dict()), f"{name}: pruning state differs"

    # the artifact: weights_only, the pruned model rebuilt, equal to the uninterrupted run's
    path = Path(full_cb.written)
    assert path.is_file() and torch.load(path, weights_only=True)["format"] == "lit-prune-artifact"
    art, again = load_artifact(path), load_artifact(resumed_cb.written)
    assert _state_equal(art.state_dict, again.state_dict) and _state_equal(art.masks, again.masks)
    model = load_model(path)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # the provenance records the constructor arguments as given, never the state (theta_0, masks)
    settings = art.provenance.settings
    assert "init_state" not in settings and "masks" not in settings and "artifact_path" not in settings
    assert settings == full_cb.settings() and settings.get("keep_init", False) == full_cb.keep_init
    if full_cb.keep_init:
        assert art.init_state is not None and _state_equal(art.init_state, again.init_state)


@pytest.mark.parametrize("name", ["l1_mask", "magnitude"])
def test_masks_stay_enforced_with_momentum_and_weight_decay(name: str, tmp_path: Path, isolated) -> None:
    factory, kwargs = METHODS[name]
    cb = factory()
    _, module = _fit(tmp_path, cb, kwargs, epochs=2)
    art = load_artifact(cb.written)
    assert art.masks, "a masked method writes its masks"
    params = dict(module.model.named_parameters())
    if name == "magnitude":  # gradual: enforced on the live model during training
        leaked = sum(int(params[n].detach()[~m.expand_as(params[n])].count_nonzero()) for n, m in cb.masks.items())
        assert leaked == 0
    model = load_model(cb.written)  # the masked artifact's zeros are its masks' zeros
    for n, p in model.named_parameters():
        if n in art.masks:
            assert not p.detach()[~art.masks[n].expand_as(p)].any()


def test_two_instances_of_one_method_keep_their_own_state() -> None:
    a, b = MagnitudePruning(amount=0.3), MagnitudePruning(amount=0.6)
    assert a.state_key != b.state_key
    assert MagnitudePruning(amount=0.3).state_key == a.state_key  # stable across processes and restarts
