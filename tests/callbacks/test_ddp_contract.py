"""The DDP contract of every pruning callback, from one template: ``python train.py fit`` on two CPU processes
(gloo) with the method given by its YAML class path.

Whatever the method, after the run

* both ranks hold the same pruning state (the callback's ``state_dict()``) and the same weights (each rank saw
  other batches: DDP's averaged gradients and the callback's broadcasts must keep the replicas identical);
* rank 0 alone wrote the artifact, once, atomically (no ``.tmp`` left), and it loads with
  ``torch.load(weights_only=True)`` into a model of its architecture.

Method-specific DDP properties (a rank-dependent proposal overridden by rank 0's, ThiNet's statistics
all-reduce) stay in the method's own test module.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lit_prune.artifact import build_model, load_artifact
from lit_prune.callbacks.base import PruningCallback
from tests.helpers import REPO, clean_env, run_process

M = "M"
RESNET20 = {"arch": "cifar_resnet20", "cfg": [4, 4, 4, 8, 8, 8, 16, 16, 16]}
VGG11 = {"arch": "cifar_vgg11", "cfg": [8, M, 8, M, 8, 8, M, 8, 8, M, 8, 8]}

#: id -> (class path, init_args, model section, epochs, artifacts rank 0 writes)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any], int, list[str]]] = {
    "l1": ("callbacks.L1FilterPruning", {"prune_ratio": 0.5}, RESNET20, 1, ["pruned.pt"]),
    "slimming": ("callbacks.NetworkSlimming", {"sparsity": 1.0e-3, "prune_ratio": 0.5},
                 {"arch": "slim_vgg11", "cfg": [8, M, 8, M, 16, 16, M, 16, 16, M, 16, 16]}, 1, ["pruned.pt"]),
    "sfp": ("callbacks.SoftFilterPruning", {"prune_ratio": 0.3}, {**RESNET20, "arch": "sfp_resnet20"}, 2,
            ["pruned.pt", "sfp-masked.pt"]),
    "magnitude_gradual": ("callbacks.MagnitudePruning", {"amount": 0.5, "start_epoch": 0, "end_epoch": 1},
                          RESNET20, 2, ["pruned.pt"]),
    "sss": ("callbacks.SparseStructureSelection", {"gamma": 0.5},
            {**RESNET20, "model_kwargs": {"gates": True}, "schedule": "constant"}, 1, ["pruned.pt"]),
    "thinet": ("callbacks.ThiNetPruning", {"prune_ratio": 0.5, "num_images": 32}, VGG11, 1, ["pruned.pt"]),
    "channel_pruning": ("callbacks.ChannelPruning", {"prune_ratio": 0.5, "num_images": 32}, VGG11, 1,
                        ["pruned.pt"]),
}
#: two methods in the default suite (a mask method and a structure method); the others are `slow`
FAST = {"l1", "sss"}
#: BN running statistics follow each rank's own batches (no SyncBN): the only state allowed to differ
PER_RANK = ("running_mean", "running_var", "num_batches_tracked")


class StateProbe(pl.Callback):
    """Test-only: at the end of fit, each rank saves its pruning callback's state and its model's weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (method,) = [cb for cb in trainer.callbacks if isinstance(cb, PruningCallback)]
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()
                   if not k.endswith(PER_RANK)}
        torch.save({"state": method.state_dict(), "weights": weights, "steps": trainer.global_step},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """``a`` and ``b`` are equal, tensors bit for bit, recursively through dicts, lists and tuples."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs across ranks"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _params() -> list:
    return [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in METHODS]


@pytest.mark.parametrize("name", _params())
def test_ddp_ranks_agree_and_rank0_writes_one_artifact(name: str, tmp_path: Path) -> None:
    class_path, init_args, model, epochs, expected = METHODS[name]
    probe, run = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "strategy": "ddp", "devices": 2, "max_epochs": epochs,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(run),
                    "callbacks": [{"class_path": class_path, "init_args": init_args},
                                  {"class_path": f"{__name__}.StateProbe", "init_args": {"out_dir": str(probe)}}]},
        "checkpoint": {"save_last": False},
        "model": {"lr": 0.05, **model},
        "data": {"class_path": "tests.helpers.RandomImageDataModule",
                 "init_args": {"num_samples": 64, "batch_size": 16}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    run_process([sys.executable, str(REPO / "train.py"), "fit", "--config", str(path)], tmp_path,
                clean_env(tmp_path))
    print(f"{name}: {time.perf_counter() - start:.1f} s")

    # both ranks end with the same pruning state and the same weights, after the same steps
    r0, r1 = (torch.load(probe / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["steps"] == r1["steps"] == epochs * 2  # 64 samples / 2 ranks / 16 per batch
    _assert_same(r0["state"], r1["state"], "callback state")
    _assert_same(r0["weights"], r1["weights"], "weights")

    # rank 0 wrote each artifact once, atomically, and it is a plain container of tensors and builtins
    artifacts = sorted(run.rglob("*.pt"))
    assert sorted(p.name for p in artifacts) == expected, artifacts
    assert not list(run.rglob("*.tmp"))
    for artifact in artifacts:
        raw = torch.load(artifact, map_location="cpu", weights_only=True)
        art = load_artifact(artifact)
        assert raw["architecture"] == art.architecture.to_dict()
        pruned = build_model(art).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.isfinite(pruned(x)).all()
