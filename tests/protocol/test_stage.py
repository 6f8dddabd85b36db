"""One stage (``python -m lit_prune.stage``, ``lit_prune.protocol.stage``): a resumed stage equals the
uninterrupted one, and a retraining stage under DDP writes one metrics file and one model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from callbacks import L1FilterPruning
from lit_prune.artifact import load_artifact, load_model
from lit_prune.models import create_model
from lit_prune.protocol.stage import run_stage
from tests.helpers import clean_env, run_process

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("isolated")


def test_stage_resumed_from_an_epoch_checkpoint_equals_the_uninterrupted_stage(tmp_path: Path, monkeypatch) -> None:
    """Also from a checkpoint written in another directory (the experiment was moved): the stage still
    writes its own last.ckpt, never a last-v1.ckpt that a later resume or the pruning step would miss."""
    monkeypatch.chdir(tmp_path)
    common = [f"--config={REPO / 'configs' / 'quickstart.yaml'}", "--seed_everything=3", "--trainer.logger=false",
              "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
              "--trainer.limit_test_batches=2", "--data.batch_size=16", "--trainer.deterministic=true",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--checkpoint.save_top_k=-1"]
    full = run_stage([f"--stage_dir={tmp_path / 'a'}", *common])
    moved = tmp_path / "b" / "checkpoints"
    moved.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch000.ckpt", moved / "last.ckpt")  # killed after epoch 1
    resumed = run_stage([f"--stage_dir={tmp_path / 'b'}", *common])

    keys = ("acc1", "acc5", "loss", "epochs", "max_epochs")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in moved.glob("last*")) == ["last.ckpt"]
    assert torch.load(moved / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2


def test_retraining_stage_under_ddp_writes_one_metrics_file_and_one_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("cifar_vgg11", cfg=[16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128], num_classes=10)
    artifact = tmp_path / "pruned.pt"
    L1FilterPruning(prune_ratio=0.3).prune(model.eval(), path=str(artifact))
    stage = tmp_path / "stage"
    cmd = [sys.executable, "-m", "lit_prune.stage", f"--stage_dir={stage}",
           f"--config={REPO / 'configs' / 'quickstart.yaml'}", "--seed_everything=0",
           f"--model.artifact={artifact}", "--model.regime=scratch", "--trainer.logger=false",
           "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
           "--data.batch_size=16", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]
    run_process(cmd, tmp_path, clean_env())

    assert sorted(p.name for p in stage.rglob("metrics.json")) == ["metrics.json"]
    assert sorted(p.name for p in stage.rglob("*.pt")) == ["model.pt"]
    assert not list(stage.rglob("*.tmp"))
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 1 and metrics["regime"] == "scratch"
    assert 0.0 <= metrics["acc1"] <= 1.0
    art = load_artifact(stage / "model.pt")
    assert art.architecture == load_artifact(artifact).architecture
    assert (stage / "checkpoints" / "last.ckpt").is_file()


def test_a_stage_retraining_a_torchvision_artifact_writes_a_model_that_rebuilds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = create_model("torchvision:mobilenet_v2", width_mult=0.25, num_classes=10)
    artifact = tmp_path / "pruned.pt"
    L1FilterPruning(prune_ratio=0.4).prune(net.eval(), path=str(artifact), input_size=(3, 32, 32))
    stage = tmp_path / "stage"
    metrics = run_stage([
        f"--stage_dir={stage}", "--seed_everything=0", f"--model.artifact={artifact}", "--model.regime=scratch",
        "--data=tests.helpers.RandomImageDataModule", "--data.num_samples=32", "--trainer.logger=false",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    art, pruned = load_artifact(stage / "model.pt"), load_artifact(artifact)
    assert (art.architecture.name, art.architecture.kwargs) == (pruned.architecture.name, pruned.architecture.kwargs)
    cuts = [[e.get("keep", e.get("value")).tolist() if torch.is_tensor(e.get("keep")) else e.get("value")
             for e in a.architecture.edits] for a in (art, pruned)]
    assert cuts[0] == cuts[1] and cuts[0]  # the same cuts
    assert art.provenance.method == "retrain:scratch" and metrics["macs"] == art.flops.pruned.macs
    rebuilt = load_model(stage / "model.pt")
    assert not torch.equal(rebuilt.features[0][0].weight, net.features[0][0].weight)  # retrained from scratch
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
