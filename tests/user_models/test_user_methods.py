"""The methods on a researcher's own LightningModule (a torchvision network as ``self.net``) on a plain Trainer.

Layer names are relative to the network (``layer1.0.conv1``, not ``net.layer1.0.conv1``); groups come from
Torch-Pruning, so residual streams and every block's convs are pruned; SSS refuses with what it needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from callbacks import L1FilterPruning, NetworkSlimming
from lit_prune.callbacks.base import unwrap
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.methods.plan import WidthPlan
from lit_prune.methods.sss import BlockSelection
from lit_prune.models import rebuildable


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    """A user's own builder (no torchvision name builds this depth)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


class UserModule(pl.LightningModule):
    """What a user writes: their own network in their own LightningModule (built through ``rebuildable`` so that
    its pruned artifact can be rebuilt with ``load_model(path, builder=tiny_resnet)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = rebuildable(tiny_resnet, num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module: pl.LightningModule, cb: pl.Callback, tmp_path: Path, data) -> None:
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=1, limit_val_batches=0,
                         num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="ResNet is not a zoo model"):  # the network, not the LightningModule
        trainer.fit(module, datamodule=data)


def test_the_network_is_found_inside_the_lightning_module() -> None:
    module = UserModule()
    assert unwrap(module) is module.net
    assert "layer1.0.conv1" in {p for g in channel_groups(module.net) for p in g.producers}


def test_l1_prunes_every_block_and_the_residual_streams_of_a_user_model(tmp_path: Path, tiny_data, isolated) -> None:
    module = UserModule()
    dense = sum(p.numel() for p in module.net.parameters())
    _fit(module, L1FilterPruning(prune_ratio=0.5, skip=["layer4.*"], aggregate="sum"), tmp_path, tiny_data)
    net = module.net
    assert net.layer1[0].conv1.out_channels == 32 and net.layer1[0].conv2.out_channels == 32  # block and stream
    assert net.conv1.out_channels == 32 and net.layer2[0].downsample[0].out_channels == 64
    assert net.layer4[0].conv1.out_channels == 512  # skipped by its relative name
    assert sum(p.numel() for p in net.parameters()) < 0.8 * dense  # layer4 (most weights) is skipped
    with torch.no_grad():
        assert module.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_slimming_prunes_a_user_model_by_its_bn_scales(tmp_path: Path, tiny_data, isolated) -> None:
    module = UserModule()
    groups = channel_groups(module.net)
    before = sum(group_size(module.net, g) for g in groups)
    _fit(module, NetworkSlimming(sparsity=1e-4, prune_ratio=0.4, floor=1, histogram_every_n_epochs=0), tmp_path,
         tiny_data)
    after = sum(group_size(module.net, g) for g in channel_groups(module.net))
    assert after < before
    with torch.no_grad():
        assert module.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_sss_refuses_a_user_model_and_says_which_models_it_needs() -> None:
    with pytest.raises(ValueError, match="only zoo models built with gates: true"):
        BlockSelection().gates(UserModule().net)


def test_round_to_rounds_ratio_widths_up_and_refuses_exact_widths() -> None:
    net = UserModule().net
    groups = channel_groups(net)
    counts = WidthPlan(prune_ratio=0.3, round_to=8).counts(net, groups)
    for g in groups:
        size = group_size(net, g)
        assert counts[g.name] % 8 == 0 or counts[g.name] == size
        assert int(size * 0.7) <= counts[g.name] < int(size * 0.7) + 8
    with pytest.raises(ValueError, match="round_to"):
        WidthPlan(keep={"conv1": 4}, round_to=8)


def test_global_ranking_removes_the_ratio_overall_within_the_layer_bounds() -> None:
    net = UserModule().net
    with torch.no_grad():
        net.layer3[0].conv1.weight.mul_(100)  # one strong layer: a global ranking spares it
    cb = L1FilterPruning(prune_ratio=0.5, global_ranking=True, max_layer_ratio=0.8, floor=2)
    keeps = cb.select(net)
    sizes = {n: k.numel() for n, k in keeps.items()}
    kept = {n: int(k.sum()) for n, k in keeps.items()}
    assert all(kept[n] >= max(2, sizes[n] - int(sizes[n] * 0.8)) for n in keeps)
    assert abs(sum(kept.values()) / sum(sizes.values()) - 0.5) < 0.1
    l1 = WidthPlan(prune_ratio=0.5).counts(net, [g for g in channel_groups(net) if g.conv])
    assert l1 != kept  # not the per-layer plan
    with pytest.raises(ValueError, match="global_ranking needs one prune_ratio"):
        L1FilterPruning(prune_ratio={"layer1.*": 0.5}, global_ranking=True)


def test_a_checkpoint_written_after_the_in_place_prune_loads_with_its_cuts(tmp_path: Path, tiny_data,
                                                                          isolated) -> None:
    from lit_prune.artifact import load_checkpoint

    module = UserModule()
    trainer = pl.Trainer(max_epochs=1, callbacks=[L1FilterPruning(prune_ratio=0.5, artifact_path=None)],
                         accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="ResNet is not a zoo model"):
        trainer.fit(module, datamodule=tiny_data)
    path = tmp_path / "after_prune.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError, match="size mismatch"):  # what Lightning's own loader does with it
        UserModule.load_from_checkpoint(path)
    loaded = load_checkpoint(UserModule, path)
    assert loaded.net.layer1[0].conv1.out_channels == module.net.layer1[0].conv1.out_channels < 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), module.eval()(x))
