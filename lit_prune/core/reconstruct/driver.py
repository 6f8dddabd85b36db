"""One group at a time: the decision of ThiNet or channel pruning for a group, and writing it.

Each driver builds the group's :class:`~lit_prune.core.reconstruct.structure.ConsumerView` once and hands it to
the statistics; the model is not changed until :func:`apply_reconstruction`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup
from lit_prune.core.reconstruct.lasso import lasso_select
from lit_prune.core.reconstruct.regression import (
    collect_regression_stats,
    compensates,
    least_squares_weight,
    regression_error,
    regression_lasso_problem,
)
from lit_prune.core.reconstruct.stats import ReduceFn
from lit_prune.core.reconstruct.structure import ConsumerView, consumer_of
from lit_prune.core.reconstruct.thinet import collect_thinet_stats, thinet_error, thinet_greedy, thinet_scales
from lit_prune.core.surgery import prune_group


@dataclass
class Reconstruction:
    """The decision for one group: which channels stay and the consumer's new weight.

    Attributes:
        keep: (C,) bool, True for the channels that stay.
        weight: the consumer's new weight at full input width (the removed channels' slices are zero), so
            that writing it and then pruning the group (:func:`apply_reconstruction`) gives the narrow layer.
        error_removed: relative reconstruction error on the samples with the kept channels and the old
            weights (plain removal).
        error_reconstructed: the same with the new weights.
        samples: number of samples the statistics summed (all processes).
        scales: ThiNet's per-channel scales (0 for removed channels).
        lasso: channel pruning's binary-search result (``alpha``, ``alpha_fraction``, ``nonzero``, ``steps``).
    """

    keep: torch.Tensor
    weight: torch.Tensor
    error_removed: float
    error_reconstructed: float
    samples: int
    scales: torch.Tensor | None = None
    lasso: dict[str, float] = field(default_factory=dict)

    def cpu(self) -> Reconstruction:
        """A copy with CPU tensors (what is broadcast between processes)."""
        return Reconstruction(self.keep.cpu(), self.weight.detach().cpu(), self.error_removed,
                              self.error_reconstructed, self.samples,
                              None if self.scales is None else self.scales.cpu(), dict(self.lasso))


def thinet_group(
    model: nn.Module,
    group: ChannelGroup,
    batches: Iterable[Any],
    num_keep: int,
    *,
    positions_per_image: int = 10,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
    ridge: float = 1e-4,
) -> Reconstruction:
    """ThiNet for one group: statistics, greedy removal, least-squares rescaling of the kept slices.

    The model is not changed; :func:`apply_reconstruction` writes the result.
    """
    view = ConsumerView.of(model, group)
    stats = collect_thinet_stats(model, group, batches, positions_per_image=positions_per_image,
                                 generator=generator, reduce_fn=reduce_fn, view=view)
    keep = thinet_greedy(stats.gram, num_keep)
    scales = thinet_scales(stats, keep, ridge)
    w = view.module.weight.detach()
    weight = (w.to(torch.float64) * view.per_input(scales).to(w.device)).to(w.dtype)
    return Reconstruction(keep, weight, thinet_error(stats, keep.to(torch.float64)), thinet_error(stats, scales),
                          stats.samples, scales=scales)


def channel_pruning_group(
    model: nn.Module,
    group: ChannelGroup,
    batches: Iterable[Any],
    num_keep: int,
    *,
    original: nn.Module | None = None,
    positions_per_image: int = 10,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
    rank_tol: float = 0.1,
    ridge: float = 1e-4,
    compensate_shortcut: bool = False,
) -> Reconstruction:
    """He et al.'s channel pruning for one group: LASSO selection, then least-squares reconstruction.

    Args:
        model: the current network (eval mode); it is not changed (see :func:`apply_reconstruction`).
        group: the group to prune.
        batches: images, or (images, targets) pairs.
        num_keep: channels kept (c').
        original: the unpruned network giving the targets Y (None: ``model`` itself).
        positions_per_image: output positions per image.
        generator: seeded CPU generator.
        reduce_fn: all-reduce (sum) of the statistics across processes.
        rank_tol: the search stops once the non-zero count lies in [c', c' (1 + rank_tol)].
        ridge: relative ridge of the reconstruction (towards the current weights).
        compensate_shortcut: at the end of a residual branch, aim at ``Y1 + Y2 - Y2'`` (see
            :func:`~lit_prune.core.reconstruct.regression.collect_regression_stats`).
    """
    view = ConsumerView.of(model, group)
    stats = collect_regression_stats(model, group, batches, original=original,
                                     positions_per_image=positions_per_image, generator=generator,
                                     reduce_fn=reduce_fn, compensate_shortcut=compensate_shortcut, view=view)
    consumer, c = view.module, view.channels
    w = consumer.weight.detach()
    # With the shortcut compensation the targets are branch outputs after the BN: scale the weights by the
    # current network's a'. Each output's least squares is its own, so only the LASSO (shared beta) and the
    # errors see the scale.
    compensate = compensates(view, original, compensate_shortcut)
    scale = view.branch_affine()[0] if compensate else torch.ones(w.shape[0], dtype=torch.float64)
    scale = scale.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
    w_out = (w.to(torch.float64) * scale).to(w.dtype)
    q_mat, q_vec = regression_lasso_problem(stats, w_out.reshape(w.shape[0], c, -1))
    keep, info = lasso_select(q_mat, q_vec, num_keep, rank_tol=rank_tol)
    plain = w * view.column_mask(keep)
    fitted = least_squares_weight(stats, w_out, keep, ridge).to(torch.float64)
    # back to the conv's own weights; an output whose branch scale is (nearly) 0 is (nearly) never seen, and
    # dividing by it would blow its weights up: it keeps its weights, pruned
    live = scale.abs() > 1e-6 * scale.abs().max()
    weight = torch.where(live, fitted / torch.where(live, scale, 1.0), plain.to(torch.float64)).to(w.dtype)
    return Reconstruction(keep, weight, regression_error(stats, (plain.to(torch.float64) * scale).to(w.dtype)),
                          regression_error(stats, (weight.to(torch.float64) * scale).to(w.dtype)),
                          stats.samples, lasso=info)


@torch.no_grad()
def apply_reconstruction(model: nn.Module, group: ChannelGroup, rec: Reconstruction) -> None:
    """Write the consumer's new weight, then remove the group's dropped channels physically."""
    _, consumer = consumer_of(model, group)
    consumer.weight.copy_(rec.weight.to(consumer.weight.device, consumer.weight.dtype))
    prune_group(model, group, rec.keep)
