"""Fixtures shared by the test suite."""

from __future__ import annotations

import pytest

from tests.helpers import RandomImageDataModule


@pytest.fixture
def tiny_data() -> RandomImageDataModule:
    """48 random 3x32x32 images of 10 classes, batches of 16 (three training steps per epoch)."""
    return RandomImageDataModule(num_samples=48, batch_size=16)
