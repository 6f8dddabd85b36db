"""Sufficient statistics of a least-squares problem (sums of outer products, float64) and their ridge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: an all-reduce (sum) across processes, applied to every accumulator once this process's images are in
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GramStats:
    """Sufficient statistics of a linear least-squares problem ``Y ~ X A``: sums over samples, float64.

    Attributes:
        gram: ``X^T X``, (D, D).
        cross: ``X^T Y``, (D, T).
        sq: ``sum Y^2`` (a scalar tensor).
        count: number of samples (rows of X), a float64 scalar tensor so that it all-reduces with the rest.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    sq: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, targets: int, device: torch.device | str | None = None) -> GramStats:
        """Empty statistics for ``dim`` regressors and ``targets`` outputs."""
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(dim, dim, **z), torch.zeros(dim, targets, **z), torch.zeros((), **z),
                   torch.zeros((), **z))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples: ``x`` (m, D) regressors, ``y`` (m, T) or (m,) targets."""
        x = x.to(torch.float64)
        y = y.to(torch.float64).reshape(x.shape[0], -1)
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(x.T, y)
        self.sq += y.square().sum()
        self.count += x.shape[0]

    def reduce(self, fn: ReduceFn | None) -> GramStats:
        """Apply ``fn`` (an all-reduce sum across processes) to every accumulator; None is the identity."""
        if fn is None:
            return self
        return GramStats(fn(self.gram), fn(self.cross), fn(self.sq), fn(self.count))

    def __add__(self, other: GramStats) -> GramStats:
        return GramStats(self.gram + other.gram, self.cross + other.cross, self.sq + other.sq,
                         self.count + other.count)

    @property
    def samples(self) -> int:
        return int(self.count.item())


def absolute_ridge(block: torch.Tensor, ridge: float) -> float:
    """Absolute ridge: ``ridge`` times the mean diagonal of the Gram block (scale-free)."""
    return ridge * float(block.diagonal().mean().clamp_min(1e-30)) if block.numel() else 0.0
