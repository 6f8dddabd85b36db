"""The width plan: how many channels each group keeps, resolved in one place for every structured method.

A plan is one of

* ``target``: a named width config of the model's family (``"B"``, ``"thinet70"``): the keep counts are
  that architecture's widths, group by group (a group the target lacks lost its whole residual branch);
* ``prune_ratio``: the fraction removed, one number for every group or ``{layer pattern: fraction}``
  (first match wins); ``num_keep = int(C * (1 - ratio))``;
* ``keep``: explicit counts per layer pattern;

plus ``skip`` (patterns left whole) and ``floor`` (at least this many channels per group). A pattern that
matches no group is refused: a typo would silently prune nothing.

Two options for models run on real hardware (both off in every paper config):

* ``round_to: N`` rounds each width that comes from a ratio *up* to a multiple of N (never above the
  layer's width), so that the pruned layers keep the channel counts kernels are fast at (FLOPs parity);
  a ``target`` or ``keep`` gives exact widths, so combining them with ``round_to`` is refused;
* ``global_ranking: true`` ranks the channels of every group together (scores normalised by their group's
  mean, so that layers of different scale compare) and removes ``prune_ratio`` of all of them with the one
  global-threshold routine (:func:`lit_prune.core.selection.global_threshold`); each group then keeps at
  least ``floor`` channels and loses at most ``max_layer_ratio`` of them, so no layer collapses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup, channel_groups, group_size
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.selection import (
    check_not_emptied,
    check_patterns,
    check_ratio,
    global_threshold,
    matches_any,
    ratio_for,
)
from lit_prune.models import create_model


def target_group_sizes(model: nn.Module, target: str) -> dict[str, int]:
    """Channels per group of ``model`` under its family's named width config ``target`` (e.g. ``"B"``).

    The target architecture is built and its groups matched to ``model``'s by name; a group missing from
    it (a residual branch the target drops) is absent from the result.
    """
    if not is_zoo_model(model):
        raise ValueError("target needs a zoo model (built with create_model); use prune_ratio otherwise")
    kwargs = {k: v for k, v in model.zoo_kwargs.items() if k not in ("cfg", "select")}  # the target brings its own
    built = create_model(model.zoo_name, cfg=target, **kwargs)
    return {g.name: group_size(built, g) for g in channel_groups(built)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class WidthPlan:
    """Per-group keep counts from ``target``, ``prune_ratio`` or ``keep`` (exactly one), ``skip`` and ``floor``.

    Raises:
        ValueError: not exactly one of the three, a ratio outside [0, 1), a negative count or floor.
    """

    target: str | None = None
    prune_ratio: float | Mapping[str, float] | None = None
    keep: Mapping[str, int] | None = None
    skip: Sequence[str] = field(default_factory=tuple)
    floor: int = 0
    #: the words for the error messages ("filters" for filter pruning, "channels" otherwise)
    unit: str = "channels"
    round_to: int = 1
    global_ranking: bool = False
    max_layer_ratio: float = 0.9

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.target, self.prune_ratio, self.keep)) != 1:
            raise ValueError("give exactly one of target (a width config name such as 'B'), prune_ratio (the "
                             "fraction removed, e.g. 0.3 keeps 70%) or keep (counts per layer pattern)")
        if self.prune_ratio is not None:
            ratios = self.prune_ratio.values() if isinstance(self.prune_ratio, Mapping) else [self.prune_ratio]
            for r in ratios:
                check_ratio(r)
        if self.keep is not None and any(not _is_int(k) or k < 0 for k in self.keep.values()):
            raise ValueError(f"keep counts must be non-negative ints, got {dict(self.keep)}")
        if not _is_int(self.floor) or self.floor < 0:
            raise ValueError(f"floor must be >= 0 (an int: the minimum {self.unit} kept per layer), got {self.floor!r}")
        if not _is_int(self.round_to) or self.round_to < 1:
            raise ValueError(f"round_to must be an int >= 1 (1: no rounding), got {self.round_to!r}")
        if self.round_to > 1 and self.prune_ratio is None:
            raise ValueError("round_to rounds widths that come from prune_ratio; a target or keep gives exact widths, "
                             "so drop round_to (or use prune_ratio)")
        if self.global_ranking and not isinstance(self.prune_ratio, (int, float)):
            raise ValueError("global_ranking needs one prune_ratio number (the fraction removed over all layers), "
                             f"got {self.prune_ratio!r}")
        check_ratio(self.max_layer_ratio, "max_layer_ratio")
        if isinstance(self.skip, str):
            raise ValueError(f"skip is a list of layer patterns, e.g. [{self.skip!r}]")
        object.__setattr__(self, "skip", tuple(self.skip))

    def counts(self, model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, int]:
        """``{group name: channels kept}`` for ``groups`` of ``model`` (skipped groups keep all).

        Raises:
            ValueError: a pattern matches none of ``groups``, a target wider than its layer, or a plain
                chain left with no channel.
        """
        names = [g.name for g in groups]
        check_patterns(self.skip, names, "skip")
        if isinstance(self.prune_ratio, Mapping):
            check_patterns(list(self.prune_ratio), names, "prune_ratio")
        if self.keep is not None:
            check_patterns(list(self.keep), names, "keep")
        for what, mapping in (("prune_ratio", self.prune_ratio), ("keep", self.keep)):
            if isinstance(mapping, Mapping):
                _check_shadowed(names, mapping, what)
        sizes = target_group_sizes(model, self.target) if self.target is not None else None
        counts = {}
        for g in groups:
            size = group_size(model, g)
            k = self._count(g.name, size, sizes)
            if k > size:
                raise ValueError(f"target width {k} of {g.name!r} is larger than the layer ({size} {self.unit})")
            k = self._round(k, size)
            k = max(k, min(self.floor, size))
            check_not_emptied(g.name, k, g.branch, f"keep more {self.unit}, lower its prune ratio or set floor: 1")
            counts[g.name] = k
        return counts

    def global_counts(self, model: nn.Module, groups: Sequence[ChannelGroup],
                      scores: Sequence[torch.Tensor]) -> dict[str, int]:
        """Keep counts from one ranking of every channel of ``groups`` (``global_ranking``), by ``scores``.

        Raises:
            ValueError: as :meth:`counts`.
        """
        names = [g.name for g in groups]
        check_patterns(self.skip, names, "skip")
        ranked = [i for i, g in enumerate(groups) if not matches_any(g.name, self.skip)]
        normalised = [scores[i].float() / scores[i].float().mean().clamp_min(1e-12) for i in ranked]
        kept = dict(zip(ranked, global_threshold(normalised, float(self.prune_ratio)), strict=True))
        counts = {}
        for i, g in enumerate(groups):
            size = group_size(model, g)
            if i not in kept:
                counts[g.name] = size
                continue
            k = max(int(kept[i].sum()), size - int(size * self.max_layer_ratio), min(self.floor, size), 1)
            counts[g.name] = self._round(k, size)
        return counts

    def _round(self, k: int, size: int) -> int:
        return min(size, -(-k // self.round_to) * self.round_to) if k else k

    def _count(self, name: str, size: int, sizes: Mapping[str, int] | None) -> int:
        if matches_any(name, self.skip):
            return size
        if sizes is not None:
            return sizes.get(name, 0)  # a group absent from the target lost its whole branch
        if self.keep is not None:
            return next((k for pattern, k in self.keep.items() if matches_any(name, [pattern])), size)
        return int(size * (1 - ratio_for(name, self.prune_ratio, default=0.0)))


def _check_shadowed(names: Sequence[str], mapping: Mapping[str, Any], what: str) -> None:
    """Refuse a pattern that never applies because earlier patterns take every layer it matches.

    The first matching pattern wins, so ``{"layer1.0.*": 0.2, "*": 0.5}`` (specific first, then a default) is
    fine, while ``{"layer1.*": 0.5, "layer1.0.*": 0.2}`` would silently never use its second value.
    """
    patterns = list(mapping)
    for i, p in enumerate(patterns):
        matched = [n for n in names if matches_any(n, [p])]
        if matched and all(matches_any(n, patterns[:i]) for n in matched):
            earlier = [q for q in patterns[:i] if any(matches_any(n, [q]) for n in matched)]
            raise ValueError(f"{what} pattern {p!r} never applies: the earlier pattern(s) {earlier} take every layer "
                             "it matches (the first matching pattern wins); put the more specific pattern first")
