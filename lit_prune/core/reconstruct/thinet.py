"""ThiNet (Luo, Wu, Lin, ICCV 2017; docs/paper-settings.md §4.2): contribution statistics, greedy removal, rescaling.

For random output positions and one random output channel ``c`` per sample, ``xhat_j`` is input channel
``j``'s contribution to that output, so ``y = sum_j xhat_j``. Only ``G = Xhat^T Xhat`` (C x C) is kept: the
greedy objective for a removed set T is ``1_T^T G 1_T``, and the rescaling solves ``(G_SS) w = (Xhat^T y)_S``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup
from lit_prune.core.reconstruct.capture import images_of, input_of, model_device
from lit_prune.core.reconstruct.sampling import extract_patches, sample_positions
from lit_prune.core.reconstruct.stats import GramStats, ReduceFn, absolute_ridge
from lit_prune.core.reconstruct.structure import ConsumerView


def thinet_contributions(
    weight: torch.Tensor, patches: torch.Tensor, out_channels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ThiNet's samples: per-input-channel contributions to one output channel per sample.

    Args:
        weight: consumer weight as (n, C, k).
        patches: (m, C, k) receptive fields.
        out_channels: (m,) the output channel c of each sample.

    Returns:
        ``xhat`` (m, C) with ``xhat[s, j] = weight[c_s, j] . patches[s, j]``, and ``y = xhat.sum(1)`` (m,),
        the pre-bias output.
    """
    xhat = (weight[out_channels] * patches).sum(-1)  # (m, C, k) -> (m, C)
    return xhat, xhat.sum(1)


@torch.no_grad()
def collect_thinet_stats(
    model: nn.Module,
    group: ChannelGroup,
    batches: Iterable[Any],
    *,
    positions_per_image: int = 10,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
    view: ConsumerView | None = None,
) -> GramStats:
    """ThiNet's statistics for ``group``: ``G = Xhat^T Xhat`` (C x C) and ``Xhat^T y`` (C x 1).

    Args:
        model: the current (possibly already partly pruned) network, in eval mode.
        group: the group whose channels the consumer reads.
        batches: images, or (images, targets) pairs.
        positions_per_image: output positions sampled per image (ThiNet uses 10).
        generator: seeded CPU generator for positions and output channels.
        reduce_fn: all-reduce (sum) applied to the accumulators after this process's images.
        view: ``group``'s consumer in ``model`` when the caller has it (None: looked up here).
    """
    view = ConsumerView.of(model, group) if view is None else view
    consumer, c = view.module, view.channels
    weight = view.weight3()  # (n, C, k)
    stats = GramStats.zeros(c, 1, device=weight.device)
    device = model_device(model)
    for batch in batches:
        x = input_of(model, view.path, images_of(batch, device))
        index = sample_positions(consumer, x, positions_per_image, generator)
        patches = extract_patches(consumer, x, index, c).to(weight.dtype)
        out = torch.randint(weight.shape[0], (patches.shape[0],), generator=generator).to(weight.device)
        xhat, y = thinet_contributions(weight, patches, out)
        stats.update(xhat, y)
    return stats.reduce(reduce_fn)


def thinet_greedy(gram: torch.Tensor, num_keep: int) -> torch.Tensor:
    """ThiNet's greedy removal (docs/paper-settings.md §4.2 step 2) on the Gram matrix of the contributions.

    Starting from an empty removed set T, repeatedly remove the channel j minimising
    ``1_{T+j}^T G 1_{T+j} = 1_T^T G 1_T + 2 (G 1_T)_j + G_jj`` until ``num_keep`` channels remain; the
    running vector ``G 1_T`` makes each step O(C).

    Returns:
        (C,) bool keep vector. Among equal costs the lowest index is removed first.
    """
    n = gram.shape[0]
    if not 0 <= num_keep <= n:
        raise ValueError(f"cannot keep {num_keep} of {n} channels")
    g = gram.to(torch.float64)
    removed = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros(n, dtype=torch.float64, device=g.device)  # G 1_T
    diag = g.diagonal()
    for _ in range(n - num_keep):
        cost = 2 * running + diag
        cost[removed.to(g.device)] = math.inf
        j = int(torch.argmin(cost))
        removed[j] = True
        running += g[:, j]
    return ~removed


def thinet_scales(stats: GramStats, keep: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """ThiNet's least-squares rescaling (docs/paper-settings.md §4.2 step 3) of the kept channels.

    Solves ``min_w sum (y - w^T xhat_S)^2 + lam ||w - 1||^2``: the ridge pulls towards 1 (plain removal),
    so a rank-deficient sample set leaves a channel's scale unchanged instead of zeroing it.

    Returns:
        (C,) float64 scales, 0 for removed channels.
    """
    keep = keep.to(torch.bool).to(stats.gram.device)
    idx = keep.nonzero().flatten()
    g = stats.gram[idx][:, idx]
    lam = absolute_ridge(g, ridge)
    rhs = stats.cross[idx, 0] + lam
    w = torch.zeros(keep.numel(), dtype=torch.float64, device=stats.gram.device)
    if idx.numel():
        w[idx] = torch.linalg.solve(g + lam * torch.eye(idx.numel(), dtype=g.dtype, device=g.device), rhs)
    return w


def thinet_error(stats: GramStats, scales: torch.Tensor) -> float:
    """``sum (y - scales^T xhat)^2 / sum y^2`` from the statistics (scales = keep vector for plain removal)."""
    w = scales.to(torch.float64).to(stats.gram.device)
    err = stats.sq - 2 * w @ stats.cross[:, 0] + w @ stats.gram @ w
    return float(err.clamp_min(0) / stats.sq.clamp_min(1e-300))
