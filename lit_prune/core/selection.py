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

    Ties are broken deterministically: among equal scores the channel with the higher index is kept first
    (a stable ascending sort, reversed). The reference code calls numpy's default ``np.argsort``, which is not
    stable, so on exactly tied scores (dead filters with all-zero weights) its choice depends on numpy's
    sorting algorithm and version; we do not claim to match it there.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} channels; the target width must lie in [0, {n}]")
    order = torch.argsort(scores, stable=True).flip(0)  # descending, later index first among ties
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


#: how a global threshold treats the k-th smallest score: ``"exact"`` removes exactly the k smallest (when
#: no scores tie), ``"reference"`` is the paper's code, ``thr = sorted(all)[k]``, which also removes the
#: (k+1)-th. Both prune scores equal to the threshold.
THRESHOLD_RULES = ("exact", "reference")


def threshold_keep(scores: Sequence[torch.Tensor], k: int, rule: str = "exact") -> list[torch.Tensor]:
    """One threshold over all ``scores`` (any shapes) that removes their ``k`` smallest values.

    Every global method (Network Slimming's BN scales, magnitude pruning's weights) decides through this
    routine. A value survives iff it is strictly greater than the threshold, so values tied with it go too.

    Args:
        scores: one tensor per layer; the keep tensors returned have the same shapes.
        k: how many of all the values to remove.
        rule: one of :data:`THRESHOLD_RULES`.

    Raises:
        ValueError: a score is NaN or infinite (a diverged model: nothing can be ranked), or an unknown rule.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores]) if scores else torch.zeros(0)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{int((~torch.isfinite(flat)).sum())} of {flat.numel()} scores are NaN or infinite: the "
                         "model has diverged (non-finite weights); prune a checkpoint from before it diverged")
    n = flat.numel()
    index = min(k, n) - 1 if rule == "exact" else min(k, n - 1)
    if n == 0 or index < 0:
        return [torch.ones_like(s, dtype=torch.bool, device="cpu") for s in scores]
    thr = torch.sort(flat).values[index]
    return [s.detach().float().cpu() > thr for s in scores]


def global_threshold(scores: Sequence[torch.Tensor], prune_ratio: float, rule: str = "exact") -> list[torch.Tensor]:
    """One threshold over all scores removing ``int(total * prune_ratio)`` of them (:func:`threshold_keep`).

    ``rule="reference"`` is Network Slimming's code, ``thr = sorted(all)[int(total * prune_ratio)]``.
    """
    check_ratio(prune_ratio)
    total = sum(s.numel() for s in scores)
    return threshold_keep(scores, int(total * prune_ratio), rule)


def check_not_emptied(name: str, kept: int, branch: Sequence[str], hint: str) -> None:
    """Refuse a decision that leaves a plain chain with no channel (only a residual branch may vanish).

    Args:
        name: the group's name.
        kept: channels it keeps.
        branch: its residual branch (empty for a plain chain).
        hint: what the user can do, e.g. ``"lower prune_ratio or set floor: 1"``.
    """
    if kept == 0 and not branch:
        raise ValueError(f"{name!r} would lose every channel and is not a residual branch, so it cannot vanish; "
                         f"{hint}")


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
