"""A researcher's own LightningModule on a plain ``pl.Trainer`` under DDP (two CPU processes, gloo): the pruning
callback's decision is rank 0's on both ranks, both replicas are pruned alike, and rank 0 alone writes the
artifact, which rebuilds the pruned network exactly."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lit_prune.artifact import load_artifact, load_model
from tests.helpers import clean_env, run_process
from tests.user_models.test_user_methods import tiny_resnet

#: the user's script: their module, their Trainer, our callback (Lightning's launcher re-runs it on rank 1)
SCRIPT = '''
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from callbacks import L1FilterPruning
from tests.helpers import RandomImageDataModule
from tests.user_models.test_user_methods import UserModule


class Probe(pl.Callback):
    def on_fit_end(self, trainer, pl_module):
        (cb,) = [c for c in trainer.callbacks if isinstance(c, L1FilterPruning)]
        torch.save({"state": cb.state_dict(), "weights": pl_module.net.state_dict(), "written": cb.written},
                   Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    pl.seed_everything(0)
    cb = L1FilterPruning(prune_ratio=0.5, aggregate="sum", skip=["layer4.*"])
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, callbacks=[cb, Probe()],
                         default_root_dir=sys.argv[1], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(UserModule(), datamodule=RandomImageDataModule(num_samples=32, batch_size=8))
'''


@pytest.mark.slow
def test_ddp_prunes_a_user_model_alike_on_both_ranks_and_rank0_writes_its_artifact(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run_process([sys.executable, str(script), str(tmp_path)], tmp_path, clean_env(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["state"]["masks"] == r1["state"]["masks"] == {}
    per_rank = ("running_mean", "running_var", "num_batches_tracked")  # each rank's own batches
    for k, v in r0["weights"].items():
        assert v.shape == r1["weights"][k].shape, k  # the same channels went on both ranks
        if not k.endswith(per_rank):
            assert torch.equal(v, r1["weights"][k]), k
    assert r0["weights"]["layer1.0.conv1.weight"].shape[0] == 32  # pruned, not only decided
    artifacts = sorted(tmp_path.rglob("*.pt"))
    assert [p.name for p in artifacts if not p.name.startswith("rank")] == ["pruned.pt"]
    assert r0["written"] == r1["written"] == str(tmp_path / "pruned.pt")
    assert not list(tmp_path.rglob("*.tmp"))
    art = load_artifact(tmp_path / "pruned.pt")
    net = load_model(tmp_path / "pruned.pt", builder=tiny_resnet)
    assert all(torch.equal(v, r0["weights"][k]) for k, v in net.state_dict().items())
    assert art.architecture.edits and art.provenance.method == "l1_norm"
