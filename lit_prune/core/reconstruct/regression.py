"""He et al.'s channel pruning (ICCV 2017; docs/paper-settings.md §5.2): patch statistics and least squares.

``Z_i`` is channel ``i``'s contribution to *all* outputs at the sampled positions. Kept: the patch Gram
``H = X^T X`` ((C k) x (C k)) and ``B = X^T Y`` ((C k) x n). With the consumer's weights W (n x C x k), the
LASSO's quadratic form is ``(Z^T Z)_ij = <W_i^T W_j, H_ij>`` and ``(Z^T Y)_i = <W_i, B_i^T>``
(:func:`regression_lasso_problem`; the LASSO itself is :mod:`~lit_prune.core.reconstruct.lasso`), and the
final least squares of W' on the kept channels S uses the sub-blocks ``H_SS`` and ``B_S``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup
from lit_prune.core.reconstruct.capture import images_of, input_of, inputs_of, model_device
from lit_prune.core.reconstruct.sampling import extract_patches, sample_positions
from lit_prune.core.reconstruct.stats import GramStats, ReduceFn, absolute_ridge
from lit_prune.core.reconstruct.structure import ConsumerView


def compensates(view: ConsumerView, original: nn.Module | None, compensate_shortcut: bool) -> bool:
    """Whether the targets get the shortcut compensation: asked for, an original network gives the targets,
    and the consumer ends a residual branch (docs/paper-settings.md §5.2 step 5)."""
    return bool(compensate_shortcut) and original is not None and view.ends_branch


@torch.no_grad()
def collect_regression_stats(
    model: nn.Module,
    group: ChannelGroup,
    batches: Iterable[Any],
    *,
    original: nn.Module | None = None,
    positions_per_image: int = 10,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
    compensate_shortcut: bool = False,
    view: ConsumerView | None = None,
) -> GramStats:
    """He et al.'s statistics for ``group``: patch Gram ``X^T X`` ((C k) x (C k)) and ``X^T Y`` ((C k) x n).

    Args:
        model: the current (already pruned up to here) network, in eval mode: it gives the inputs X.
        group: the group whose channels the consumer reads.
        batches: images, or (images, targets) pairs.
        original: the unpruned network (same module paths, frozen) that gives the targets
            ``Y = W_orig x_orig`` (pre-bias) at the same positions (docs/paper-settings.md §5.2 step 1); None takes them
            from ``model`` itself.
        positions_per_image: output positions sampled per image (He et al. use 10).
        generator: seeded CPU generator for the positions.
        reduce_fn: all-reduce (sum) applied to the accumulators after this process's images.
        compensate_shortcut: when the consumer ends a residual branch (:attr:`ConsumerView.ends_branch`) and
            ``original`` is given, aim at ``Y1 + Y2 - Y2'`` (docs/paper-settings.md §5.2 step 5): the original branch
            output plus the original shortcut minus the current network's shortcut, so that the refitted
            branch makes up for the error the shortcut already carries. These targets live where the two
            paths are added, after the end conv's BN and gate
            (:meth:`~lit_prune.core.protocols.ResidualBlock.branch_affine`: ``a z + b``): the original's
            ``a Y1 + b`` plus ``Y2 - Y2'``, minus the current network's ``b'`` (which differs from ``b`` once
            fine-tuning between layers has moved the BN), so the regressors' weights must be scaled by the
            current ``a'`` (:func:`~lit_prune.core.reconstruct.driver.channel_pruning_group` does).
        view: ``group``'s consumer in ``model`` when the caller has it (None: looked up here).
    """
    view = ConsumerView.of(model, group) if view is None else view
    consumer, c, weight = view.module, view.channels, view.weight3()  # weight: (n, C, k)
    ref = None if original is None else ConsumerView.of(original, group)
    if ref is not None and ref.outputs != view.outputs:
        raise ValueError(f"{view.path} has {view.outputs} outputs but {ref.outputs} in the original "
                         "network; prune shallow to deep so that each consumer's outputs are still whole")
    ref_weight = None if ref is None else ref.weight3()  # (n, C_orig, k)
    compensate = compensates(view, original, compensate_shortcut)
    if compensate:
        if ref.block is None:
            raise ValueError(f"{view.path} ends a residual branch of the network but not of the original")
        scale, shift = ref.branch_affine()
        shift = shift - view.branch_affine()[1]  # b - b'
        paths, ref_paths = (view.block_path, view.path), (view.block_path, ref.path)
    stats = GramStats.zeros(c * weight.shape[2], weight.shape[0], device=weight.device)
    device = model_device(model)
    for batch in batches:
        images = images_of(batch, device)
        if compensate:
            x_block, x = inputs_of(model, paths, images)
        else:
            x = input_of(model, view.path, images)
        index = sample_positions(consumer, x, positions_per_image, generator)
        patches = extract_patches(consumer, x, index, c).to(weight.dtype)  # (m, C, k)
        if ref is None:
            target_patches, target_weight = patches, weight
        else:
            ref_images = images.to(model_device(original))
            if compensate:
                x_ref_block, x_ref = inputs_of(original, ref_paths, ref_images)
            else:
                x_ref = input_of(original, ref.path, ref_images)
            target_patches = extract_patches(ref.module, x_ref, tuple(t.to(x_ref.device) for t in index),
                                             ref.channels)
            target_weight = ref_weight
        y = torch.einsum("mck,nck->mn", target_patches.to(target_weight.dtype), target_weight)  # (m, n)
        y = y.to(stats.gram.device, torch.float64)
        if compensate:
            # Y2 - Y2' at the sampled positions (the end conv's output map is the block's): (m, n)
            img, row, col = index
            sc = view.block.shortcut_output(x_block)[img, :, row, col]
            img, row, col = (t.to(x_ref_block.device) for t in index)
            sc_ref = ref.block.shortcut_output(x_ref_block)[img, :, row, col]
            y = y * scale.to(y.device) + shift.to(y.device) + (sc_ref.to(y) - sc.to(y))
        stats.update(patches.flatten(1), y)
    return stats.reduce(reduce_fn)


def regression_lasso_problem(stats: GramStats, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LASSO's quadratic form in channel coefficients beta, derived from the patch statistics.

    With ``Z_i = X_i W_i^T`` the contribution of channel i to all n outputs (flattened over samples and
    outputs, N = m n rows), returns ``Q = Z^T Z / N`` (C x C) and ``q = Z^T vec(Y) / N`` (C,), so that
    ``(1 / 2N) ||Y - sum_i beta_i Z_i||^2 = 1/2 beta^T Q beta - q^T beta + const``.

    Args:
        stats: patch statistics from :func:`collect_regression_stats`.
        weight: the consumer's current weight, (n, C, k) or its conv/linear shape.
    """
    if weight.dim() not in (3, 4):
        raise ValueError(f"weight must be (n, C, k) or a conv's (n, C, kh, kw), got shape {tuple(weight.shape)}")
    n, c = weight.shape[:2]
    w = weight.detach().reshape(n, -1).to(torch.float64).to(stats.gram.device)  # (n, C k)
    k = w.shape[1] // c
    # (Z^T Z)_ij = sum_{k,l} (W_i^T W_j)_{kl} H_{(i,k),(j,l)}
    zz = ((w.T @ w) * stats.gram).reshape(c, k, c, k).sum(dim=(1, 3))
    # (Z^T Y)_i = sum_{o,k} W[o, i, k] B[(i, k), o]
    zy = (w.T * stats.cross).reshape(c, k * n).sum(dim=1)
    rows = stats.count.clamp_min(1) * n
    return zz / rows, zy / rows


def least_squares_weight(
    stats: GramStats, weight: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-4
) -> torch.Tensor:
    """Least-squares reconstruction of the consumer on the kept channels (docs/paper-settings.md §5.2 step 3).

    Solves ``min_W' ||Y - X_S W'^T||^2 + lam ||W' - W_S||^2`` with ``(H_SS + lam I) W'^T = B_S + lam W_S^T``.
    The ridge pulls towards the current weights, so directions the samples do not determine keep their
    values (plain least squares when the samples outnumber the unknowns, as in He et al.).

    Args:
        stats: patch statistics (X^T X, X^T Y).
        weight: the consumer's current weight (any shape whose dim 0 is n and dim 1 is C).
        keep: (C,) bool.
        ridge: relative ridge (times the mean diagonal of ``H_SS``).

    Returns:
        The new weight, same shape and dtype as ``weight``, with the removed channels' slices zero.
    """
    n = weight.shape[0]
    w0 = weight.detach().reshape(n, -1).to(torch.float64).to(stats.gram.device)  # (n, C k)
    c = keep.numel()
    k = w0.shape[1] // c
    idx = _tap_index(keep.to(stats.gram.device), k)
    h = stats.gram[idx][:, idx]
    lam = absolute_ridge(h, ridge)
    rhs = stats.cross[idx] + lam * w0[:, idx].T  # (|S| k, n)
    new = torch.zeros_like(w0)
    if idx.numel():
        eye = torch.eye(idx.numel(), dtype=h.dtype, device=h.device)
        new[:, idx] = torch.linalg.solve(h + lam * eye, rhs).T
    return new.reshape(weight.shape).to(weight.dtype).to(weight.device)


def _tap_index(keep: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the (C k) patch statistics that belong to the kept channels."""
    ch = keep.to(torch.bool).nonzero().flatten()
    return (ch[:, None] * k + torch.arange(k, device=ch.device)).flatten()


def regression_error(stats: GramStats, weight: torch.Tensor) -> float:
    """``||Y - X W^T||^2 / ||Y||^2`` from the statistics, for a consumer weight W (n, C, ...)."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64).to(stats.gram.device)
    cols = (w != 0).any(dim=0).nonzero().flatten()  # removed channels' zero columns do not count
    w, h, b = w[:, cols], stats.gram[cols][:, cols], stats.cross[cols]
    err = stats.sq - 2 * (w.T * b).sum() + ((w @ h) * w).sum()
    return float(err.clamp_min(0) / stats.sq.clamp_min(1e-300))
