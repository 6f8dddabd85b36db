"""Soft Filter Pruning (He et al., IJCAI 2018), as plain PyTorch: in every selected conv the lowest-norm filters
are masked, each conv on its own. When to re-select (and the soft, regrowing schedule) is the callback's,
:class:`lit_prune.callbacks.SoftFilterPruning`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup, channel_groups
from lit_prune.core.importance import criterion_names, group_scores
from lit_prune.core.masks import Masks
from lit_prune.core.selection import check_patterns, check_ratio, matches_any, top_k
from lit_prune.methods.base import Context, Decision, PruningMethod


class SoftFilterSelection(PruningMethod):
    """The filters to zero in every selected conv (arguments: see the callback).

    Raises:
        ValueError: ``prune_ratio`` outside [0, 1), an unknown criterion, empty ``layers``.
    """

    name = "sfp"

    def __init__(self, prune_ratio: float = 0.3, layers: Sequence[str] = ("*",), skip: Sequence[str] = (),
                 criterion: str = "l2") -> None:
        check_ratio(prune_ratio)
        _check_filter_criterion(criterion)
        if isinstance(layers, str) or isinstance(skip, str):
            raise ValueError("layers and skip are lists of patterns, e.g. layers: ['*'] or skip: ['conv1']")
        if not layers:
            raise ValueError("layers is empty: give patterns of the convs to prune, e.g. ['*'] for all of them")
        self.prune_ratio = float(prune_ratio)
        self.layers, self.skip = list(layers), list(skip)
        self.criterion = criterion

    def target_convs(self, model: nn.Module) -> list[str]:
        """Module names of the convs this callback prunes, in ``named_modules`` order.

        Raises:
            ValueError: a ``layers``/``skip`` pattern matches no conv, or nothing is left to prune.
        """
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        check_patterns(self.layers, names, "layers")
        check_patterns(self.skip, names, "skip")
        chosen = [n for n in names if matches_any(n, self.layers) and not matches_any(n, self.skip)]
        if not chosen:
            raise ValueError(f"layers {self.layers} minus skip {self.skip} leaves no conv to prune")
        return chosen

    def compute_masks(self, model: nn.Module) -> Masks:
        """This rank's selection: ``{"<conv>.weight": bool (C_out, 1, 1, 1)}``, False = zeroed filter.

        Each conv on its own (no global ranking): its ``int(C_out * prune_ratio)`` lowest-scoring filters
        are zeroed; among equal scores the lower index goes first, as a stable ``argsort()[:n]``.
        """
        masks: Masks = {}
        for path in self.target_convs(model):
            weight = model.get_submodule(path).weight  # (C_out, C_in / groups, kh, kw)
            scores = group_scores(model, ChannelGroup(name=path, conv=path), self.criterion)  # (C_out,)
            n_zero = int(scores.numel() * self.prune_ratio)
            keep = top_k(scores, scores.numel() - n_zero)
            masks[f"{path}.weight"] = keep.reshape(-1, *([1] * (weight.dim() - 1)))
        return masks

    @staticmethod
    def removable_keeps(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
        """Keep vectors ``{group name: bool (C,)}`` for the masked convs that surgery can shrink.

        A channel group qualifies when its producing conv is masked and its channels are that conv's
        filters (in the CIFAR ResNets: each block's first conv). Raises TypeError for a model without
        declared channel groups.
        """
        keeps = {}
        for g in channel_groups(model):
            mask = masks.get(f"{g.conv}.weight") if g.conv is not None else None
            if mask is None or g.selection is not None or g.conv not in g.producers:
                continue
            if g.members:  # a Torch-Pruning group: only one conv may write its channels (not a residual stream)
                writers = [p for p in g.producers if isinstance(model.get_submodule(p), (nn.Conv2d, nn.Linear))]
                own = next(m for m in g.members if m.path == g.conv and m.kind == "out")
                if writers != [g.conv] or own.idx != own.roots:
                    continue
            keeps[g.name] = mask.flatten().bool()
        return keeps

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        return Decision(masks=self.compute_masks(model))


def _check_filter_criterion(criterion: str) -> None:
    """Refuse names that are not registered, or that score something else than conv filters (BN gamma)."""
    if criterion not in criterion_names():
        raise ValueError(f"unknown criterion {criterion!r}; SFP uses 'l2' (or 'l1')")
    try:  # score a one-filter conv: criteria that read a BatchNorm cannot
        group_scores(nn.Sequential(nn.Conv2d(1, 1, 1)), ChannelGroup(name="0", conv="0"), criterion)
    except ValueError:
        raise ValueError(f"criterion {criterion!r} does not score conv filters; SFP uses 'l2' (or 'l1')") from None
