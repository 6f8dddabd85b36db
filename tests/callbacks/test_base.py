"""PruningCallback plumbing: masks enforced during fit, saved in checkpoints, restored on resume."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from callbacks import PruningCallback
from lit_prune.callbacks.base import unwrap
from lit_prune.module import ImageClassifier

CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]
MASKED = ("layer1.0.conv1.weight", "layer2.1.conv2.weight", "fc.weight")


def _random_masks(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Unstructured masks (half of each weight): their gradients are non-zero, so only enforcement
    keeps them at zero (a structured mask that also zeroes BN would get zero gradients anyway)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < 0.5 for n in MASKED}


class FixedMasks(PruningCallback):
    """Masks chosen from ``seed`` at fit start, unless a checkpoint restored some."""

    def __init__(self, seed: int) -> None:
        super().__init__(artifact_path=None)
        self.seed = seed
        self.masked_grad_seen = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self.masks:
            self.set_masks(trainer, unwrap(pl_module), _random_masks(unwrap(pl_module), self.seed))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # record that the gradient would revive masked weights, so the enforcement below is what matters
        params = dict(unwrap(pl_module).named_parameters())
        for n, m in self.masks.items():
            g = params[n].grad
            self.masked_grad_seen |= g is not None and bool((g[~m] != 0).any())
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def _trainer(tmp_path: Path, max_epochs: int, cb: PruningCallback) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                      callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)


def _leaked(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> int:
    params = dict(model.named_parameters())
    return sum(int(params[n].detach()[~m].count_nonzero()) for n, m in masks.items())


def test_masks_enforced_saved_and_restored_on_resume(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    first = FixedMasks(seed=0)
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1, weight_decay=5e-4)
    trainer = _trainer(tmp_path, 1, first)
    trainer.fit(module, datamodule=tiny_data)
    assert set(first.masks) == set(MASKED) and first.masked_grad_seen
    assert _leaked(module.model, first.masks) == 0
    assert first.dense_counts is not None and first.dense_counts["macs"] > 0

    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    state = saved["callbacks"][first.state_key]
    assert all(torch.equal(state["masks"][n], first.masks[n]) for n in MASKED)
    assert state["dense"] == first.dense_counts

    # a fresh instance whose own choice would differ: the checkpoint's masks must win
    second = FixedMasks(seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(_random_masks(module.model, 1).values(), first.masks.values()))
    resumed = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1, weight_decay=5e-4)
    trainer2 = _trainer(tmp_path, 3, second)
    trainer2.fit(resumed, datamodule=tiny_data, ckpt_path=ckpt)
    assert trainer2.current_epoch == 3
    assert set(second.masks) == set(MASKED)
    assert all(torch.equal(second.masks[n], first.masks[n]) for n in MASKED)
    assert second.dense_counts == first.dense_counts
    # still enforced in the resumed epochs (the gradients would have revived them), momentum included
    assert second.masked_grad_seen
    assert _leaked(resumed.model, second.masks) == 0
    optimizer = trainer2.optimizers[0]
    params = dict(resumed.model.named_parameters())
    for n, m in second.masks.items():
        assert torch.all(optimizer.state[params[n]]["momentum_buffer"][~m] == 0)
    # and training did go on: kept weights moved since the checkpoint
    w = params["layer1.0.conv1.weight"].detach()
    assert not torch.equal(w, saved["state_dict"]["model.layer1.0.conv1.weight"])


def test_without_enforcement_masked_weights_come_back(tmp_path: Path, tiny_data) -> None:
    """Control for the test above: the same masks, not enforced, leak during training."""

    class Unenforced(FixedMasks):
        enforce_masks = False

    pl.seed_everything(0)
    cb = Unenforced(seed=0)
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1)
    _trainer(tmp_path, 1, cb).fit(module, datamodule=tiny_data)
    assert _leaked(module.model, cb.masks) > 0
