"""Filter-norm pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), as plain PyTorch.

In every selected layer keep the filters with the largest L1 (or L2) norm; the keep counts come from the
:class:`~lit_prune.methods.plan.WidthPlan` (the paper's targets are named width configs: VGG-16-A,
ResNet-56-A/B, ResNet-110-A/B, ResNet-34-A/B). ``mode: mask`` keeps the full-size model and masks each
pruned filter with its BN channel and the next layer's input slice (the structured lottery tickets).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_prune.core.groups import channel_groups
from lit_prune.core.importance import AGGREGATES, criterion_names, group_scores
from lit_prune.core.masks import group_masks, merge
from lit_prune.core.selection import top_k
from lit_prune.methods.base import Context, Decision, PruningMethod
from lit_prune.methods.plan import WidthPlan


class FilterNormPruning(PruningMethod):
    """Keep the highest-norm filters of every conv-produced channel group, per layer.

    Args:
        widths: the keep counts.
        criterion: ``"l1"`` (the paper) or ``"l2"``.
        mode: ``"physical"`` (remove the filters) or ``"mask"`` (zero them, with BN and the consumers' inputs).
        aggregate: ``"first"`` (the group's own conv, the paper), ``"sum"`` or ``"mean"`` of the norms of
            every conv/linear layer coupled in the group (see :func:`lit_prune.core.importance.group_scores`).

    Raises:
        ValueError: an unknown criterion or mode.
    """

    name = "l1_norm"

    def __init__(self, widths: WidthPlan, criterion: str = "l1", mode: str = "physical",
                 aggregate: str = "first") -> None:
        if mode not in ("physical", "mask"):
            raise ValueError(f"mode must be 'physical' (remove filters) or 'mask' (zero them), got {mode!r}")
        if criterion not in criterion_names():
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(criterion_names())}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)} (how the norms of a group's coupled "
                             f"layers combine), got {aggregate!r}")
        self.widths, self.criterion, self.mode, self.aggregate = widths, criterion, mode, aggregate

    def keeps(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{group name: keep vector}``: the top filters of each group by the criterion."""
        groups = [g for g in channel_groups(model) if g.conv is not None]
        scores = [group_scores(model, g, self.criterion, self.aggregate) for g in groups]
        counts = (self.widths.global_counts(model, groups, scores) if self.widths.global_ranking
                  else self.widths.counts(model, groups))
        return {g.name: top_k(s, counts[g.name]) for g, s in zip(groups, scores, strict=True)}

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        keeps = self.keeps(model)
        if self.mode == "physical":
            return Decision(keeps=keeps)
        groups = {g.name: g for g in channel_groups(model)}
        return Decision(masks=merge(*[group_masks(model, groups[n], k, consumers=True) for n, k in keeps.items()]))

