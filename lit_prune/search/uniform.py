"""The uniform baseline of a pruned model (Section 5, Figure 3): the same network pruned by one width multiplier
(one sparsity, for a masked model) to as many parameters as the method's result, or as many FLOPs.

Structured: every group the method could prune (its width plan's groups, ``skip`` honoured) keeps
``int(C * m)`` of its ``C`` channels (at least one), the rounding of :class:`lit_prune.methods.plan.WidthPlan`,
for the one ``m`` found by bisection whose count is nearest the method's. Masked (unstructured): every masked
tensor keeps its largest-magnitude ``1 - s`` weights, for the one ``s`` found the same way. Counts are
conv + linear MACs at the artifact's input size and parameters, non-zero where masks exist
(:mod:`lit_prune.core.flops`). The result is an architecture with fresh weights, trained from scratch, whose
Scratch-B ratio is its own FLOPs ratio to the large model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_prune.artifact import Architecture, Artifact, make_artifact
from lit_prune.core.groups import ChannelGroup, channel_groups, group_size
from lit_prune.core.masks import Masks, apply_masks
from lit_prune.core.selection import matches_any
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.plan import WidthPlan
from lit_prune.methods.state import Counts
from lit_prune.models import architecture, create_model

log = logging.getLogger(__name__)
MATCHES = ("params", "flops")
_STEPS = 30  # bisection steps: far below one channel of any real layer


@dataclass(frozen=True)
class Uniform:
    """A uniform architecture: the multiplier (or sparsity) found, and its counts against the target's."""

    artifact: Artifact
    value: float  # the width multiplier m, or the sparsity s of a masked model
    target: int
    reached: int


def _measure(counts: Counts, match: str) -> int:
    return counts.params if match == "params" else counts.macs


def prunable_groups(model: nn.Module, method: Any = None) -> list[ChannelGroup]:
    """The groups a method's width plan could prune: those its criterion scores (filter norms: conv-produced
    groups; slimming: groups with a BN), less its ``skip`` patterns. Without a method: every group."""
    groups = channel_groups(model)
    pruner = getattr(method, "pruner", None)
    plan = getattr(pruner, "widths", None)
    if pruner is not None and type(pruner).__name__ == "FilterNormPruning":
        groups = [g for g in groups if g.conv is not None]
    elif pruner is not None and hasattr(pruner, "find_bns"):  # slimming scores BN scales
        groups = [g for g in groups if g.bn is not None]
    skip = tuple(plan.skip) if isinstance(plan, WidthPlan) else ()
    return [g for g in groups if not matches_any(g.name, skip)]


def shapes_device(build: Callable[[], nn.Module]) -> str:
    """``"meta"`` where ``build()`` works there (shapes only, no memory), else ``"cpu"`` (a model that checks its
    channel-selection indices against their values, which meta tensors do not have)."""
    try:
        with torch.device("meta"):
            model = build()
        with torch.no_grad():
            model.eval()(torch.zeros(1, *getattr(model, "input_size", (3, 32, 32))))
        return "meta"
    except (RuntimeError, NotImplementedError):
        return "cpu"


def _first(size: int, k: int) -> torch.Tensor:
    return torch.arange(size) < k


def _bisect(count: Callable[[float], int], target: int, lo: float, hi: float) -> float:
    """The value in ``[lo, hi]`` whose (non-decreasing) count is nearest ``target``."""
    c_lo, c_hi = count(lo), count(hi)
    if target <= c_lo:
        return lo
    if target >= c_hi:
        return hi
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if target - count(lo) < count(hi) - target else hi


def uniform_widths(large: nn.Module, target_art: Artifact, match: str = "params", method: Any = None) -> Uniform:
    """The uniformly narrowed ``large`` with the counts of ``target_art`` (see the module docstring)."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    size = target_art.input_size or tuple(getattr(large, "input_size", (3, 32, 32)))
    arch = Architecture.of(large)
    device = shapes_device(arch.build)
    with torch.device(device):  # shapes are all the search needs
        skeleton = arch.build()
    groups = prunable_groups(skeleton, method)
    if not groups:
        raise ValueError(f"{arch.name} has no group that the method could prune (all skipped?)")
    target = _measure(target_art.flops.pruned, match)

    def keeps(m: float) -> dict[str, torch.Tensor]:
        counts = WidthPlan(prune_ratio=min(1.0 - m, 1.0 - 1e-12), floor=1).counts(skeleton, groups)
        return {g.name: _first(group_size(skeleton, g), counts[g.name]) for g in groups}

    def narrowed(m: float) -> nn.Module:
        with torch.device(device):
            model = arch.build()
        prune_groups(model, keeps(m))
        return model

    cache: dict[tuple[int, ...], int] = {}  # many multipliers give the same widths

    def count(m: float) -> int:
        key = tuple(int(k.sum()) for k in keeps(m).values())
        if key not in cache:
            cache[key] = _measure(Counts.of(narrowed(m), input_size=size), match)
        return cache[key]

    m = _bisect(count, target, 0.0, 1.0)
    shape = architecture(narrowed(m))
    model = create_model(shape["name"], **shape["kwargs"])  # a fresh initialisation of the uniform widths
    reached = _measure(Counts.of(model, input_size=size), match)
    art = make_artifact(model, method="uniform", dense=target_art.flops.dense, settings={
        "of": target_art.provenance.method, "match": match, "multiplier": m, "target": target, "reached": reached,
        "groups": [g.name for g in groups], "weights": "fresh initialisation, none inherited"})
    return Uniform(art, m, target, reached)


@torch.no_grad()
def magnitude_masks(model: nn.Module, names: Sequence[str], sparsity: float) -> Masks:
    """Per tensor, the ``int(N * sparsity)`` smallest-magnitude weights masked."""
    params = dict(model.named_parameters())
    masks: Masks = {}
    for name in names:
        w = params[name].detach().abs().flatten()
        k = int(w.numel() * sparsity)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        if k:
            keep[torch.argsort(w, stable=True)[:k].cpu()] = False
        masks[name] = keep.view(params[name].shape)
    return masks


def uniform_sparsity(large: nn.Module, target_art: Artifact, match: str = "params") -> Uniform:
    """One sparsity for every tensor the method masked, by magnitude in ``large``, with the counts (non-zero) of
    ``target_art``; the artifact has fresh weights under those masks (Scratch-E/B re-initialise them)."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    names = sorted(target_art.masks)
    size = target_art.input_size or tuple(getattr(large, "input_size", (3, 32, 32)))
    target = _measure(target_art.flops.pruned, match)
    work = copy.deepcopy(large).cpu()
    original = {k: v.detach().clone() for k, v in work.state_dict().items()}

    def count(s: float) -> int:
        work.load_state_dict(original)
        apply_masks(work, magnitude_masks(work, names, s))
        return _measure(Counts.of(work, nonzero=True, input_size=size), match)

    # count() grows with density: bisect over 1 - s
    density = _bisect(lambda d: count(1.0 - d), target, 0.0, 1.0)
    s = 1.0 - density
    masks = magnitude_masks(large, names, s)
    model = Architecture.of(large).build()
    apply_masks(model, masks)
    reached = _measure(Counts.of(model, nonzero=True, input_size=size), match)
    art = make_artifact(model, method="uniform", dense=target_art.flops.dense, masks=masks, settings={
        "of": target_art.provenance.method, "match": match, "sparsity": s, "target": target, "reached": reached,
        "weights": "fresh initialisation under the masks"})
    return Uniform(art, s, target, reached)


def uniform_baseline(large: nn.Module, target_art: Artifact, match: str = "params", method: Any = None) -> Uniform:
    """:func:`uniform_sparsity` for a masked artifact, else :func:`uniform_widths`."""
    if target_art.masks:
        return uniform_sparsity(large, target_art, match)
    return uniform_widths(large, target_art, match, method)
