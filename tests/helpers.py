"""Small utilities shared by the tests: tiny in-memory data, randomised BN, masks from keeps, child processes
(DDP runs, the protocol runner) and the runner's stages executed in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune.core.groups import channel_groups
from lit_prune.core.masks import Masks, group_masks, merge


class RandomImageDataModule(pl.LightningDataModule):
    """``num_samples`` random 3x32x32 images with random labels, in memory (fast, no files).

    The same seed gives the same tensors, so two Trainers see identical data.
    """

    def __init__(self, num_samples: int = 48, batch_size: int = 16, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (num_samples,), generator=g)
        self.batch_size = batch_size
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _loader(self, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(False)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BN running stats and affine parameters.

    With the default init (gamma 1, beta 0, mean 0, var 1) a zeroed channel stays zero through BN,
    so masked-vs-pruned comparisons would pass even if the mask forgot the BN; random values make a
    forgotten beta or running mean visible.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.randn(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g))


def masks_from_keeps(model: nn.Module, keeps: Mapping[str, torch.Tensor]) -> Masks:
    """The structured masks that simulate ``prune_groups(model, keeps)``."""
    groups = {g.name: g for g in channel_groups(model)}
    return merge(*(group_masks(model, groups[name], keep) for name, keep in keeps.items()))


# ---- child processes -----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
#: what a launched (DDP) run must not inherit from the test process: torch.distributed's rendezvous and
#: Lightning's global seed
_NOT_INHERITED = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                  "PL_GLOBAL_SEED")


def clean_env(*extra_paths: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child run: one thread, the repository (and ``extra_paths``) importable."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(map(str, [REPO, *extra_paths])), **(extra or {}))
    return env


def run_process(cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion in its own session and assert it succeeded.

    On a timeout the whole session (a DDP launcher and the ranks it started) is killed and the test fails.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... did not finish in {timeout} s")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def execute_in_process(self: Any, st: Any, verbose: bool) -> None:
    """Stand-in for ``lit_prune.rethink.Protocol._execute``: the stage's command, without a new Python process."""
    from lit_prune.cli.prune import main as prune_main
    from lit_prune.protocol.stage import run_stage

    assert st.command[:2] == [sys.executable, "-m"], st.command
    module, args = st.command[2], st.command[3:]
    if module == "lit_prune.stage":
        run_stage(args)
    elif module == "lit_prune.prune":
        assert prune_main(args) == 0
    elif module == "lit_prune.search":
        from lit_prune.search.cli import main as search_main

        assert search_main(args) == 0
    else:
        raise AssertionError(f"unexpected stage command {st.command}")
