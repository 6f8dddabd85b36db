"""Which channels survive: per-layer keep counts, per-pattern ratios, one global threshold, a floor.

Every function returns boolean *keep* vectors (True = the channel survives), separate from scoring
(:mod:`lit_prune.core.importance`) and from surgery (:mod:`lit_prune.core.surgery`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch


def check_ratio(ratio: float, name: str = "prune_ratio") -> float:
    """A prune ratio is the fraction *removed* and must lie in [0, 1)."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(
            f"{name} must be a fraction removed in [0, 1), got {ratio!r}"
            + (" (keep ratios such as SFP's rate 0.7 mean prune_ratio 0.3)" if isinstance(ratio, float) else "")
        )
    return float(ratio)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores.

    Ties are broken as the reference code's ``np.argsort(scores)[::-1][:k]`` does with a stable sort:
    among equal scores the channel with the higher index is kept first.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} channels; the target width must lie in [0, {n}]")
    order = torch.argsort(scores, stable=True).flip(0)  # descending, later index first among ties
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def global_threshold(scores: Sequence[torch.Tensor], prune_ratio: float) -> list[torch.Tensor]:
    """One threshold over all scores, as Network Slimming and weight pruning do.

    ``thr = sorted(all)[int(total * prune_ratio)]`` and a channel survives iff its score is strictly
    greater: values equal to the threshold are pruned, so slightly more than ``prune_ratio`` may go.
    """
    check_ratio(prune_ratio)
    flat = torch.cat([s.flatten().float() for s in scores])
    if flat.numel() == 0:
        return [torch.zeros(0, dtype=torch.bool) for _ in scores]
    thr = torch.sort(flat).values[int(flat.numel() * prune_ratio)]
    return [s.float() > thr for s in scores]


def apply_floor(scores: torch.Tensor, keep: torch.Tensor, floor: int) -> torch.Tensor:
    """Keep at least ``floor`` channels (the highest-scoring ones) so that no layer vanishes."""
    if floor <= 0 or int(keep.sum()) >= min(floor, keep.numel()):
        return keep
    return keep | top_k(scores, min(floor, keep.numel()))


def ratio_for(name: str, ratios: Mapping[str, float] | float, default: float | None = None) -> float | None:
    """The prune ratio of group ``name``: a number, or the first matching shell pattern of a mapping."""
    if isinstance(ratios, (int, float)):
        return float(ratios)
    for pattern, ratio in ratios.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(ratio)
    return default


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(patterns: Sequence[str], names: Sequence[str], what: str) -> None:
    """Refuse patterns that match no group (a typo would silently prune nothing)."""
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            shown = ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"{what} pattern {p!r} matches no prunable layer; layer names look like: {shown}")
