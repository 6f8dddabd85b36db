"""The LASSO of He et al.'s channel selection: coordinate descent on a quadratic form, and the alpha search.

Plain NumPy on the (C x C) quadratic form that :func:`~lit_prune.core.reconstruct.regression.regression_lasso_problem`
derives from the patch statistics; nothing here touches a model.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def lasso(
    q_mat: np.ndarray, q_vec: np.ndarray, alpha: float, beta: np.ndarray | None = None,
    max_sweeps: int = 1000, tol: float = 1e-7,
) -> np.ndarray:
    """LASSO on a quadratic form by cyclic coordinate descent: ``min 1/2 b^T Q b - q^T b + alpha ||b||_1``.

    Warm-started from ``beta``. Each sweep visits every coordinate in index order; between full sweeps,
    only the non-zero coordinates are cycled until they settle (the active-set strategy of glmnet).
    ``max_sweeps`` bounds all sweeps together; ``tol`` is the largest coordinate change, relative to the
    scale ``max |q| / max Q_jj`` of the coefficients, at which a full sweep counts as converged.
    A channel with ``Q_jj = 0`` (no contribution) stays at 0.

    Returns:
        The coefficients (float64 array of length C).
    """
    n = q_vec.shape[0]
    beta = np.zeros(n) if beta is None else beta.astype(np.float64).copy()
    diag = np.diagonal(q_mat).copy()
    live = np.flatnonzero(diag > 0)
    beta[diag <= 0] = 0.0
    grad = q_mat @ beta  # Q beta, updated incrementally
    scale = max(float(np.abs(q_vec).max(initial=0.0)) / max(float(diag.max(initial=0.0)), 1e-300), 1e-300)

    def sweep(coords: np.ndarray) -> float:
        biggest = 0.0
        for j in coords:
            bj = beta[j]
            rho = q_vec[j] - grad[j] + diag[j] * bj
            new = math.copysign(max(abs(rho) - alpha, 0.0), rho) / diag[j]
            if new != bj:
                delta = new - bj
                grad[:] += delta * q_mat[j]  # Q is symmetric: row j = column j
                beta[j] = new
                biggest = max(biggest, abs(delta))
        return biggest

    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        if sweep(live) <= tol * scale:  # a full sweep changed nothing: converged
            break
        while sweeps < max_sweeps:  # settle the active set before the next full sweep
            sweeps += 1
            if sweep(live[beta[live] != 0]) <= tol * scale:
                break
    return beta


def lasso_select(
    q_mat: torch.Tensor,
    q_vec: torch.Tensor,
    num_keep: int,
    *,
    rank_tol: float = 0.1,
    max_steps: int = 60,
) -> tuple[torch.Tensor, dict[str, float]]:
    """He et al.'s LASSO channel selection with a binary search on alpha (docs/paper-settings.md §5.2 step 2).

    The search looks for an alpha whose solution has between ``num_keep`` and ``num_keep (1 + rank_tol)``
    non-zero coefficients, as He et al.'s does, but brackets it from above: at ``alpha_max = max |q|`` every
    coefficient is zero; alpha is halved until at least ``num_keep`` are non-zero, then bisected until the
    count lies in the window (or ``max_steps`` LASSO solves pass: the smallest count >= num_keep seen is used).
    He et al. double alpha up from 1e-3 instead; the solves near least squares that this starts with are
    the slow ones (ill-conditioned), while going down each solve is warm-started from a sparser one -- about
    15x faster at 1024 to 2048 channels -- and the search does not depend on the scale of the activations.
    Exactly ``num_keep`` channels are kept: the largest |beta| (ties, and channels beyond the non-zeros, by
    their contribution energy ``Q_jj``).

    Returns:
        ``(keep, info)``: a (C,) bool vector with exactly ``num_keep`` True, and ``{"alpha", "alpha_fraction"
        (alpha / alpha_max), "nonzero", "steps"}`` of the solution used.
    """
    n = q_vec.numel()
    if not 0 <= num_keep <= n:
        raise ValueError(f"cannot keep {num_keep} of {n} channels")
    qm = q_mat.detach().to(torch.float64).cpu().numpy()
    qv = q_vec.detach().to(torch.float64).cpu().numpy()
    diag = np.diagonal(qm).copy()
    alpha_max = float(np.abs(qv).max(initial=0.0))  # at or above it every coefficient is zero
    window = num_keep * (1 + rank_tol)
    live = diag > 0  # channels that contribute at all; only they can be non-zero
    beta, best, steps = live.astype(np.float64), None, 0
    if 0 < num_keep < int(live.sum()) and alpha_max > 0:
        beta = np.zeros(n)
        hi = alpha_max  # count 0 < num_keep
        while steps < max_steps:  # halve down until at least num_keep coefficients are non-zero
            alpha = hi / 2
            beta = lasso(qm, qv, alpha, beta)
            steps += 1
            nnz = int(np.count_nonzero(beta))
            if nnz >= num_keep:
                best = (beta, alpha, nnz)
                break
            hi = alpha
        while best is not None and best[2] > window and steps < max_steps:  # bisect [best alpha, hi]
            mid = 0.5 * (best[1] + hi)
            trial = lasso(qm, qv, mid, best[0])
            steps += 1
            nnz = int(np.count_nonzero(trial))
            if nnz < num_keep:
                hi = mid
            else:
                best = (trial, mid, nnz)
    if best is None:  # nothing to search (keep every contributing channel, or none) or no bracket in max_steps
        best = (beta, 0.0, int(np.count_nonzero(beta)))
    beta = best[0]
    info = {"alpha": best[1], "alpha_fraction": best[1] / alpha_max if alpha_max > 0 else 0.0,
            "nonzero": float(best[2]), "steps": float(steps)}
    # rank: |beta| first, contribution energy second; stable sorts, so the lower index wins remaining ties
    order = np.argsort(-diag, kind="stable")
    order = order[np.argsort(-np.abs(beta[order]), kind="stable")]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.as_tensor(order[:num_keep].copy())] = True
    return keep, info
