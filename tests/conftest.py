"""Fixtures shared by the test suite."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import RandomImageDataModule


@pytest.fixture
def tiny_data() -> RandomImageDataModule:
    """48 random 3x32x32 images of 10 classes, batches of 16 (three training steps per epoch)."""
    return RandomImageDataModule(num_samples=48, batch_size=16)


@pytest.fixture
def isolated(monkeypatch):
    """One intra-op thread (tiny models; a second thread only adds contention on a shared 2-core machine),
    and no global state left behind by in-process Lightning runs (seed, deterministic mode)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)  # restored at teardown
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
