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


def group_scores(model: nn.Module, group: ChannelGroup, criterion: str) -> torch.Tensor:
    """One score per channel of ``group`` under the named ``criterion``."""
    if criterion not in _CRITERIA:
        raise KeyError(f"unknown criterion {criterion!r}; choose one of {', '.join(criterion_names())}")
    fn, source = _CRITERIA[criterion]
    path = group.conv if source == "conv" else group.bn
    if path is None:
        raise ValueError(f"group {group.name!r} has no {source} to score with criterion {criterion!r}")
    module = model.get_submodule(path)
    scores = fn(module.weight)
    if group.selection is not None:  # a stream BN is full width; score only what the selection reads
        scores = scores[model.get_submodule(group.selection).indices]
    return scores.float().cpu()
