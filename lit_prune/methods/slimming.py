"""Network Slimming (Liu et al., ICCV 2017), as plain PyTorch: the L1 subgradient on BatchNorm scales during
training, and one global |gamma| threshold over every BN-scored channel group at the end. The Lightning callback
is :class:`lit_prune.callbacks.NetworkSlimming`."""

from __future__ import annotations

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup, channel_groups
from lit_prune.core.importance import AGGREGATES, group_scores
from lit_prune.core.selection import THRESHOLD_RULES, apply_floor, check_not_emptied, check_ratio, global_threshold
from lit_prune.methods.base import Context, Decision, PruningMethod


class BNScaleSlimming(PruningMethod):
    """Sparsity on the BN scales, then one global threshold (arguments: see the callback).

    Raises:
        ValueError: an argument outside its range (the message names it).
    """

    name = "network_slimming"

    def __init__(self, sparsity: float = 1e-4, prune_ratio: float = 0.7, include_bn1d: bool = False,
                 floor: int = 0, threshold: str = "exact", aggregate: str = "first") -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not sparsity >= 0:
            raise ValueError(f"sparsity (the L1 weight s on BN gamma) must be a number >= 0, got {sparsity!r}; "
                             "the paper uses 1e-4 (CIFAR VGG) or 1e-5 (PreResNet, DenseNet, ImageNet)")
        check_ratio(prune_ratio, "prune_ratio")
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"floor (minimum channels kept per layer) must be an int >= 0, got {floor!r}")
        self.sparsity, self.prune_ratio, self.include_bn1d = float(sparsity), float(prune_ratio), include_bn1d
        if threshold not in THRESHOLD_RULES:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLD_RULES)} ('reference': the paper's code, "
                             f"sorted[k], which removes one channel more), got {threshold!r}")
        self.floor, self.threshold = floor, threshold
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)} (how the scales of a group's coupled "
                             f"norms combine), got {aggregate!r}")
        self.aggregate = aggregate

    # ---- sparsity ------------------------------------------------------------------------------------
    def regularised(self, bn: nn.Module) -> bool:
        """Whether ``bn`` gets the penalty: every BatchNorm2d, LayerNorm and GroupNorm (with affine scales; the
        norms of ConvNeXt and ViT streams, or GroupNorm nets, outside the zoo), BatchNorm1d only with
        ``include_bn1d``."""
        # A SyncBatchNorm no longer says whether it was 1d or 2d; one present before fit is taken as 2d.
        if isinstance(bn, nn.BatchNorm1d):
            return self.include_bn1d
        if isinstance(bn, nn.LayerNorm):
            return bn.elementwise_affine
        if isinstance(bn, nn.GroupNorm):
            return bn.affine
        return isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))

    def find_bns(self, model: nn.Module) -> list[str]:
        """Module paths of the regularised BNs of ``model``."""
        return [n for n, m in model.named_modules() if self.regularised(m) and getattr(m, "weight", None) is not None]

    @torch.no_grad()
    def add_sparsity_grad(self, model: nn.Module, bns: list[str]) -> None:
        """``gamma.grad += s * sign(gamma)`` for the BNs ``bns`` of ``model`` (where a gradient exists)."""
        if self.sparsity == 0:
            return
        for name in bns:
            g = model.get_submodule(name).weight
            if g.grad is not None:
                g.grad.add_(torch.sign(g.detach()), alpha=self.sparsity)

    # ---- pruning -------------------------------------------------------------------------------------
    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        return Decision(keeps=self.keeps(model))

    def keeps(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keep vectors of every BN-scored group under one global |gamma| threshold.

        Raises:
            ValueError: the model has no BN-scored groups, or a layer that is not a residual branch would
                lose every channel (set ``floor: 1`` or lower ``prune_ratio``).
        """
        groups = [g for g in channel_groups(model) if g.bn is not None and self.regularised(model.get_submodule(g.bn))]
        if not groups:
            raise ValueError(f"{type(model).__name__} has no channel group with a BatchNorm"
                             f"{'' if self.include_bn1d else '2d'} to score; Network Slimming needs BN layers")
        scores = [group_scores(model, g, "bn_gamma", self.aggregate) for g in groups]
        keeps = global_threshold(scores, self.prune_ratio, rule=self.threshold)
        keeps = [apply_floor(s, k, self.floor) for s, k in zip(scores, keeps, strict=True)]
        result = {g.name: k for g, k in zip(groups, keeps, strict=True)}
        self._check_vanishing(groups, result)
        return result

    def _check_vanishing(self, groups: list[ChannelGroup], keeps: dict[str, torch.Tensor]) -> None:
        # Residual branches pruned to nothing disappear whole; a group living inside one (a block's
        # selection, read only by that block's conv1) goes with it. Anything else may not reach zero.
        gone = {p for g in groups if g.branch and not bool(keeps[g.name].any()) for p in g.branch}
        for g in groups:
            if bool(keeps[g.name].any()) or g.branch:
                continue
            touched = set(g.producers) | set(g.consumers)
            if touched and touched <= gone:
                continue
            check_not_emptied(
                g.name, 0, g.branch,
                f"Network Slimming's global threshold (prune_ratio {self.prune_ratio}) removes all of it (scored by "
                f"BN {g.bn!r}). Set floor: 1 to keep each layer's strongest channel, or lower prune_ratio (the paper "
                "has no floor; docs/paper-settings.md §12.14)",
            )
