"""ChannelPruning (He et al.): original-network targets, the channel sampler, a real Trainer run, and DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import lit_prune.methods.channel_pruning as cp_module
from callbacks import ChannelPruning
from lit_prune.artifact import load_artifact, load_model
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from tests.callbacks.test_thinet import CFG, HALF, run_ddp


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cifar_vgg11", cfg=CFG).eval()


def _loader(n: int = 32, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.zeros(n, dtype=torch.long)),
                      batch_size=16)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="rank_tol"):
        ChannelPruning(prune_ratio=0.5, rank_tol=-0.1)
    with pytest.raises(ValueError, match="exactly one of target"):
        ChannelPruning()
    assert ChannelPruning(target="5x").needs_data


class _Spy(ChannelPruning):
    """Records the widths of the current network and of the reference at every layer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, list[int], list[int]]] = []
        refit = self.pruner.reconstruct_group

        def spy(model, reference, group, *rest):
            widths = lambda m: [group_size(m, g) for g in channel_groups(m)]  # noqa: E731
            self.calls.append((group.name, widths(model), widths(reference)))
            return refit(model, reference, group, *rest)

        self.pruner.reconstruct_group = spy


def test_inputs_from_the_pruned_network_targets_from_the_original() -> None:
    model = _model()
    spy = _Spy(prune_ratio=0.5, layers=["features.0", "features.4", "features.8"], num_images=16,
               artifact_path=None)
    art = spy.prune(model, dataloader=_loader())
    assert [c[0] for c in spy.calls] == ["features.0", "features.4", "features.8"]  # shallow to deep
    # docs/paper-settings.md §5.2 step 1: the current network is already pruned before each layer, the reference never
    # is
    assert [c[1][:3] for c in spy.calls] == [[8, 8, 8], [4, 8, 8], [4, 4, 8]]
    assert all(c[2] == [8] * 8 for c in spy.calls)
    assert art.architecture.kwargs["cfg"] == [4, "M", 4, "M", 4, 8, "M", 8, 8, "M", 8, 8]
    assert [r["kept"] for r in spy.results] == [4, 4, 4]
    assert all(r["nonzero"] >= r["kept"] for r in spy.results)  # the LASSO's non-zeros, before keeping c'


def test_refit_lowers_the_error_of_every_layer() -> None:
    cb = ChannelPruning(prune_ratio=0.5, num_images=32, artifact_path=None)
    cb.prune(_model(), dataloader=_loader())
    assert len(cb.results) == 8
    assert all(r["error_reconstructed"] < r["error_removed"] for r in cb.results)


def test_too_large_statistics_are_refused_with_a_hint(monkeypatch) -> None:
    monkeypatch.setattr(cp_module, "MAX_STATISTICS_DIM", 8 * 9 - 1)
    with pytest.raises(ValueError, match=r"'features.0'.*would not fit.*skip: \[features.0\]"):
        ChannelPruning(prune_ratio=0.5, num_images=16, artifact_path=None).prune(_model(), dataloader=_loader())


def test_channel_sampler_prunes_block_inputs_of_an_imagenet_resnet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet34", num_classes=10).eval()
    cb = ChannelPruning(prune_ratio=0.5, layers=["layer1.0.*"], channel_sampler=True, num_images=8,
                        positions_per_image=4, artifact_path=str(tmp_path / "p.pt"))
    art = cb.prune(model, dataloader=_loader(8, size=64))
    kwargs = art.architecture.kwargs
    assert kwargs["cfg"][:2] == [32, 64]
    assert len(kwargs["select"][0]) == 32 and kwargs["select"][1:] == [None] * 15
    assert [r["layer"] for r in cb.results] == ["layer1.0.select", "layer1.0.conv1"]
    assert not any(hasattr(b, "select") for b in model.blocks())  # the live model is untouched
    pruned = load_model(tmp_path / "p.pt")  # rebuilt from data: the selection indices come back
    assert pruned.layer1[0].select.indices.tolist() == kwargs["select"][0]
    assert pruned(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="channel_sampler needs an ImageNet ResNet"):
        ChannelPruning(prune_ratio=0.5, channel_sampler=True).prune(_model(), dataloader=_loader())


def test_fit_writes_a_loadable_artifact_with_the_requested_widths(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    module = ImageClassifier(arch="cifar_vgg11", cfg=CFG, num_classes=tiny_data.num_classes, lr=0.05)
    cb = ChannelPruning(prune_ratio=0.5, skip=["features.25"], num_images=32)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=tmp_path, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=tiny_data)
    path = Path(trainer.log_dir) / "pruned.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["architecture"]["kwargs"]["cfg"] == HALF[:-1] + [8]
    assert raw["provenance"]["method"] == "channel_pruning"
    assert raw["provenance"]["settings"]["rank_tol"] == 0.1
    assert all(0 < r["alpha_fraction"] < 1 for r in raw["provenance"]["settings"]["layer_results"])
    assert load_model(path)(torch.randn(2, 3, 32, 32)).shape == (2, tiny_data.num_classes)


PROBE = '''
"""Test-only channel-pruning callback recording each rank's decision before the broadcast."""
import os

import torch

from callbacks import ChannelPruning


class ProbeCP(ChannelPruning):
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
        self._seen[group.name] = {"keep": rec.keep.cpu(), "weight": rec.weight.cpu(), "samples": rec.samples,
                                  "alpha": rec.lasso["alpha"]}
        return rec

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(self._seen, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
'''


def test_ddp_ranks_share_statistics_and_write_one_artifact(tmp_path: Path) -> None:
    run, ranks = run_ddp(tmp_path, PROBE, "ddp_probe.ProbeCP", {"prune_ratio": 0.5, "num_images": 32})
    assert not set(ranks[0]["images"]) & set(ranks[1]["images"])
    assert ranks[0]["features.0"]["samples"] == ranks[1]["features.0"]["samples"] == 320
    layers = [k for k in ranks[0] if k != "images"]
    assert len(layers) == 8
    for name in layers:
        assert torch.equal(ranks[0][name]["keep"], ranks[1][name]["keep"]), name
        assert ranks[0][name]["alpha"] == ranks[1][name]["alpha"]
        torch.testing.assert_close(ranks[0][name]["weight"], ranks[1][name]["weight"], rtol=0, atol=0)
    artifacts = sorted(run.rglob("*.pt"))
    assert [p.name for p in artifacts] == ["pruned.pt"], artifacts
    assert load_artifact(artifacts[0]).architecture.kwargs["cfg"] == HALF
