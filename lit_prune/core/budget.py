"""Scratch-B: train the pruned architecture for the same computation as the large model (docs/paper-settings.md §1.3).

``r = FLOPs(large) / FLOPs(pruned)``, measured on the actual pruned (or masked) model. Which FLOPs is the
caller's choice (``lit_prune.core.flops.count_flops(..., convention=...)``): the paper computed its epochs
with its reference counters (``convention="reference"``: BN, ReLU and pooling too, docs/paper-settings.md §1.4), so the
paper's experiment configs set ``scratch_b: {convention: reference}``; the MACs ratio agrees on the L1
models (VGG-16-A 243, ResNet-56-B 220 epochs either way) but gives 4-25 more epochs on slimming and
weight-level models (slimmed VGG-19 at 70%: 1768 instead of the reference's 1763). The epochs are
stretched by r and so are the LR changes:

* ``"fractions"`` (CIFAR): ``E = int(base * r)``, LR x0.1 at ``int(0.5 E)`` and ``int(0.75 E)``
  (VGG-16-A: r = 1.519 -> 243 epochs, milestones 121/182);
* ``"thirds"`` (ImageNet): ``E = int(base * r)`` with a step every ``E // 3`` epochs, and with the
  paper's cap (2.0): when r >= cap, ``E = int(base * cap)`` (90 -> 180 epochs, step 60);
* ``"scale"``: every given milestone multiplied by r (SFP's ``1, 60, 120, 160`` schedule), first kept;
* ``"multiples"``: a step of ``int(first milestone * r)`` epochs, the milestones its multiples (SSS:
  ``30, 60, 90`` -> ``35, 70, 105`` for ResNet-41, r = 1.18).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lit_prune.core.schedule import milestones_for

RULES = ("fractions", "thirds", "scale", "multiples")


@dataclass(frozen=True)
class ScratchBudget:
    """The epochs and LR milestones of a Scratch-B run.

    Attributes:
        epochs: training epochs.
        milestones: epochs at which the LR changes.
        ratio: the measured FLOPs ratio r.
        factor: the stretch actually applied (r, or the cap).
    """

    epochs: int
    milestones: list[int]
    ratio: float
    factor: float

    def to_dict(self) -> dict:
        return asdict(self)


def scratch_b_budget(
    base_epochs: int,
    ratio: float,
    *,
    rule: str = "fractions",
    cap: float | None = None,
    base_milestones: Sequence[int] | None = None,
) -> ScratchBudget:
    """Epochs and milestones for Scratch-B.

    Args:
        base_epochs: epochs of the large model (Scratch-E's budget), e.g. 160 on CIFAR, 90 on ImageNet.
        ratio: ``FLOPs(large) / FLOPs(pruned)``; must be >= 1 up to rounding (a pruned model is not larger).
        rule: ``"fractions"``, ``"thirds"``, ``"scale"`` or ``"multiples"`` (see the module docstring).
        cap: largest stretch (the paper's 2.0 on ImageNet); None for no cap.
        base_milestones: the large model's milestones, for ``"scale"`` and ``"multiples"``.

    Raises:
        ValueError: a cap below 1, a ratio below 1, an unknown rule, or ``"scale"`` without milestones.
    """
    if base_epochs < 1:
        raise ValueError(f"base_epochs must be >= 1, got {base_epochs}")
    if cap is not None and cap < 1:
        raise ValueError(f"Scratch-B cap must be >= 1 (the paper uses 2.0 on ImageNet), got {cap}")
    if ratio < 1 - 1e-6:
        raise ValueError(f"FLOPs ratio {ratio:.4f} < 1: the 'pruned' model costs more than the large one; "
                         "check that the artifact belongs to this experiment")
    if rule not in RULES:
        raise ValueError(f"unknown Scratch-B rule {rule!r}; choose one of {', '.join(RULES)}")
    factor = ratio if cap is None else min(ratio, cap)
    epochs = int(base_epochs * factor)
    if rule in ("fractions", "thirds"):  # the training scripts' own defaults, at the new length
        milestones = milestones_for("multistep" if rule == "fractions" else "step", epochs)
    else:
        if not base_milestones:
            raise ValueError(f"the {rule!r} rule needs base_milestones (the large model's LR milestones)")
        if rule == "scale":
            milestones = [int(base_milestones[0])] + [int(m * factor) for m in base_milestones[1:]]
        else:
            first = int(base_milestones[0])
            if any(m % first for m in base_milestones):
                raise ValueError(f"the 'multiples' rule needs milestones that are multiples of the first, got "
                                 f"{list(base_milestones)}")
            step = int(first * factor)
            milestones = [step * (int(m) // first) for m in base_milestones]
    return ScratchBudget(epochs, milestones, float(ratio), float(factor))
