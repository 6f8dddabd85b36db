"""Importance criteria: pure functions from a tensor to one score per channel, registered by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup

Criterion = Callable[[torch.Tensor], torch.Tensor]

_CRITERIA: dict[str, tuple[Criterion, str]] = {}


def register_criterion(name: str, source: str) -> Callable[[Criterion], Criterion]:
    """Register ``fn(tensor) -> scores`` under ``name``; ``source`` is ``"conv"`` or ``"bn"``."""

    def wrap(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = (fn, source)
        return fn

    return wrap


@register_criterion("l1", "conv")
def filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """Sum of |w| over each output filter: (C_out, C_in, k, k) -> (C_out,). L1-norm pruning (Li et al.)."""
    return weight.detach().abs().flatten(1).sum(1)


@register_criterion("l2", "conv")
def filter_l2(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter: (C_out, ...) -> (C_out,). Soft Filter Pruning."""
    return weight.detach().flatten(1).norm(p=2, dim=1)


@register_criterion("bn_gamma", "bn")
def bn_gamma(gamma: torch.Tensor) -> torch.Tensor:
    """|gamma| of a BatchNorm: (C,) -> (C,). Network Slimming."""
    return gamma.detach().abs()


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


#: how a criterion is combined over the coupled layers of a group (Torch-Pruning groups couple many)
AGGREGATES = ("first", "sum", "mean")


def group_scores(model: nn.Module, group: ChannelGroup, criterion: str, aggregate: str = "first") -> torch.Tensor:
    """One score per channel of ``group`` under the named ``criterion``.

    Args:
        aggregate: over which layers of the group the criterion is taken. ``"first"``: the group's own
            conv (``conv``, filter criteria) or norm (``bn``, scale criteria) only -- the paper's rule, and
            all there is in a zoo group. ``"sum"`` / ``"mean"``: every coupled layer the criterion applies
            to (each conv/linear producer for filter criteria, each BatchNorm/LayerNorm/GroupNorm for scale criteria)
            scores the channel, and the scores are summed / averaged. A channel that owns several rows of
            one layer (an attention head's ``3 * head_dim`` qkv rows) gets the sum of their scores.

    Raises:
        KeyError: an unknown criterion. ValueError: an unknown aggregate, or nothing in the group to score.
    """
    if criterion not in _CRITERIA:
        raise KeyError(f"unknown criterion {criterion!r}; choose one of {', '.join(criterion_names())}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    fn, source = _CRITERIA[criterion]
    path = group.conv if source == "conv" else group.bn
    if path is None:
        raise ValueError(f"group {group.name!r} has no {source} to score with criterion {criterion!r}")
    if group.members:
        return _member_scores(model, group, fn, source, path, aggregate)
    module = model.get_submodule(path)
    scores = fn(module.weight)
    if group.selection is not None:  # a stream BN is full width; score only what the selection reads
        scores = scores[model.get_submodule(group.selection).indices]
    return scores.float().cpu()


def _member_scores(model: nn.Module, group: ChannelGroup, fn: Criterion, source: str, first: str,
                   aggregate: str) -> torch.Tensor:
    from lit_prune.core.graph import SCALE_NORMS, member_size

    kinds = (nn.Conv2d, nn.Linear) if source == "conv" else SCALE_NORMS
    n = member_size(group)
    per_layer = []
    for m in group.members:
        if m.kind != "out" or (aggregate == "first" and m.path != first):
            continue
        module = model.get_submodule(m.path)
        if not isinstance(module, kinds) or module.weight is None:
            continue
        rows = fn(module.weight).float().cpu()
        idx, roots = torch.tensor(m.idx, dtype=torch.long), torch.tensor(m.roots, dtype=torch.long)
        per_layer.append(torch.zeros(n).index_add_(0, roots, rows[idx]))
    total = torch.stack(per_layer).sum(0)
    return total / len(per_layer) if aggregate == "mean" else total
