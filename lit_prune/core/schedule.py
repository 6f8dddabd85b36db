"""Learning-rate schedules of the paper, as per-epoch multiplicative factors (docs/paper-settings.md §1.2)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

SCHEDULES = ("multistep", "step", "constant")


class PiecewiseConstant:
    """LR factor for an epoch: the product of ``gammas[i]`` over every milestone ``<= epoch``.

    Covers the paper's three shapes: x0.1 at 50% and 75% of the epochs, x0.1 every N epochs, and
    SFP's ``--schedule 1 60 120 160 --gammas 10 0.2 0.2 0.2``. A plain object (lists of numbers), so
    ``LambdaLR.state_dict`` stores it and checkpoints stay loadable with ``weights_only=True``.
    """

    def __init__(self, milestones: Sequence[int], gammas: Sequence[float]) -> None:
        if len(milestones) != len(gammas):
            raise ValueError(f"{len(milestones)} milestones but {len(gammas)} gammas; give one gamma per milestone")
        self.milestones = [int(m) for m in milestones]
        self.gammas = [float(g) for g in gammas]

    def __call__(self, epoch: int) -> float:
        factor = 1.0
        for m, g in zip(self.milestones, self.gammas):
            if epoch >= m:
                factor *= g
        return factor


def milestones_for(
    schedule: str,
    max_epochs: int,
    milestones: Sequence[int] | None = None,
    step_size: int | None = None,
) -> list[int]:
    """Epochs at which the LR changes.

    Args:
        schedule: ``"multistep"`` (``milestones``, default 50% and 75% of ``max_epochs``), ``"step"``
            (every ``step_size`` epochs, default a third of ``max_epochs`` as the ImageNet scripts), or
            ``"constant"``.
        max_epochs: the run's length; defaults scale with it, which is how Scratch-B stretches them.
    """
    if schedule == "constant":
        return []
    if schedule == "multistep":
        if milestones is None:
            # a milestone at epoch 0 would cut the LR before any training (runs of one epoch): none then
            return [m for m in (int(0.5 * max_epochs), int(0.75 * max_epochs)) if m >= 1]
        steps = [int(m) for m in milestones]
        if steps != sorted(steps) or any(m < 1 for m in steps):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {list(milestones)}")
        late = [m for m in steps if m >= max_epochs]
        if late and max_epochs > 1:  # a shortened debug run may mean it; a full run would silently lose a decay
            log.warning("LR milestones %s are not before max_epochs %d: the LR never changes there", late, max_epochs)
        return steps
    if schedule == "step":
        step = step_size or max(max_epochs // 3, 1)
        if step < 1:
            raise ValueError(f"step_size must be >= 1, got {step}")
        return list(range(step, max_epochs, step))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
