"""Data-driven channel pruning by output reconstruction: ThiNet and He et al.'s channel pruning.

Both methods choose the channels of a group by the layer that *reads* them (the group's consumer:
the next conv, or a Linear after a flatten), keeping the input channels that best reconstruct the
consumer's output on training images, and then refit the consumer's weights on the kept channels.

* **ThiNet** (Luo, Wu, Lin, ICCV 2017; paper-spec 4.2): for random output positions and one random
  output channel ``c`` per sample, ``xhat_j`` is input channel ``j``'s contribution to that output, so
  ``y = sum_j xhat_j``. Channels are removed greedily, each time the one whose removal adds the least
  squared error, then every kept input slice of the consumer is rescaled by least squares.
* **Channel pruning** (He, Zhang, Sun, ICCV 2017; paper-spec 5.2): ``Z_i`` is channel ``i``'s
  contribution to *all* outputs at the sampled positions; a LASSO on the coefficients ``beta_i`` of the
  flattened ``Z_i``, with ``alpha`` found by binary search, selects the channels, and the consumer's
  weights on them are refitted by least squares against targets ``Y`` (from the original network when
  one is given, so that errors do not accumulate layer after layer).

**Statistics, not samples.** Every quantity both methods need is a sum of outer products over the
samples (:class:`GramStats`, float64):

* ThiNet: ``G = Xhat^T Xhat`` (C x C). The greedy objective for a removed set T is
  ``sum_samples (sum_{t in T} xhat_t)^2 = 1_T^T G 1_T``, and the rescaling solves
  ``(G_SS) w = (Xhat^T y)_S`` -- with ``Xhat^T y = G 1`` since ``y`` is the sum of the contributions.
* Channel pruning: the patch Gram ``H = X^T X`` ((C k) x (C k), one row per input channel and kernel tap)
  and ``B = X^T Y`` ((C k) x n). The LASSO's quadratic form follows from them and the consumer's weights
  W (n x C x k): ``(Z^T Z)_ij = <W_i^T W_j, H_ij>`` and ``(Z^T Y)_i = <W_i, B_i^T>``; the final least
  squares of W' on the kept channels S uses the sub-blocks ``H_SS`` and ``B_S``.

Their size does not depend on the number of samples, so memory stays flat however many images are used,
and under data parallelism each process sums its own images and one all-reduce (``reduce_fn``, a sum)
gives every process the same statistics -- no raw samples are gathered.

Sampling: the consumer's input is captured by a forward pre-hook (the rest of the forward pass is
skipped), ``positions_per_image`` distinct output positions per image are drawn with a seeded
:class:`torch.Generator` (every position when the map is smaller), and only the receptive fields at
those positions are gathered -- never a full ``unfold`` of the feature map. A Linear consumer reading
``C`` channels of ``r`` columns each (after a flatten) gives one sample per image with ``k = r``.

Everything here is plain PyTorch (NumPy for the coordinate descent); the Lightning callbacks
(``callbacks.ThiNetPruning``, ``callbacks.ChannelPruning``) drive it layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core.groups import ChannelGroup, group_size
from lit_prune.core.surgery import prune_group

ReduceFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "GramStats",
    "Reconstruction",
    "apply_reconstruction",
    "branch_affine",
    "channel_pruning_group",
    "collect_regression_stats",
    "collect_thinet_stats",
    "consumer_of",
    "extract_patches",
    "lasso",
    "lasso_select",
    "least_squares_weight",
    "regression_error",
    "regression_lasso_problem",
    "residual_block_of",
    "sample_positions",
    "thinet_contributions",
    "thinet_error",
    "thinet_greedy",
    "thinet_group",
    "thinet_scales",
]


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class GramStats:
    """Sufficient statistics of a linear least-squares problem ``Y ~ X A``: sums over samples, float64.

    Attributes:
        gram: ``X^T X``, (D, D).
        cross: ``X^T Y``, (D, T).
        sq: ``sum Y^2`` (a scalar tensor).
        count: number of samples (rows of X), a float64 scalar tensor so that it all-reduces with the rest.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    sq: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, targets: int, device: torch.device | str | None = None) -> GramStats:
        """Empty statistics for ``dim`` regressors and ``targets`` outputs."""
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(dim, dim, **z), torch.zeros(dim, targets, **z), torch.zeros((), **z),
                   torch.zeros((), **z))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples: ``x`` (m, D) regressors, ``y`` (m, T) or (m,) targets."""
        x = x.to(torch.float64)
        y = y.to(torch.float64).reshape(x.shape[0], -1)
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(x.T, y)
        self.sq += y.square().sum()
        self.count += x.shape[0]

    def reduce(self, fn: ReduceFn | None) -> GramStats:
        """Apply ``fn`` (an all-reduce sum across processes) to every accumulator; None is the identity."""
        if fn is None:
            return self
        return GramStats(fn(self.gram), fn(self.cross), fn(self.sq), fn(self.count))

    def __add__(self, other: GramStats) -> GramStats:
        return GramStats(self.gram + other.gram, self.cross + other.cross, self.sq + other.sq,
                         self.count + other.count)

    @property
    def samples(self) -> int:
        return int(self.count.item())


# --------------------------------------------------------------------------------------- the consumer


def consumer_of(model: nn.Module, group: ChannelGroup) -> tuple[str, nn.Module]:
    """The one consumer (path, module) whose output reconstruction decides ``group``'s channels.

    Raises:
        ValueError: the group has no consumer or several (a DenseNet stream), or the consumer is not a
            plain Conv2d (zero padding, no groups) or Linear.
    """
    if len(group.consumers) != 1:
        raise ValueError(
            f"group {group.name!r} is read by {len(group.consumers)} layers {list(group.consumers)}; "
            "reconstruction pruning (ThiNet, channel pruning) needs exactly one consumer"
        )
    path = group.consumers[0]
    m = model.get_submodule(path)
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"{path}: only ungrouped convs with numeric zero padding can be reconstructed")
    elif not isinstance(m, nn.Linear):
        raise ValueError(f"{path} is a {type(m).__name__}; reconstruction needs a Conv2d or Linear consumer")
    return path, m


def _weight3(module: nn.Module, channels: int) -> torch.Tensor:
    """The consumer's weight as (n, C, k): k kernel taps of a conv, or the columns per channel of a linear."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], channels, -1)


# ------------------------------------------------------------------------------------------- sampling


def sample_positions(
    module: nn.Module, x: torch.Tensor, positions_per_image: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw output positions of ``module`` for a batch of its inputs ``x``.

    Args:
        module: the consumer (Conv2d or Linear).
        x: its input, (B, C, H, W) or (B, C * r).
        positions_per_image: distinct positions per image (all of them when the output map is smaller).
        generator: the seeded CPU generator the draw comes from.

    Returns:
        ``(image, row, col)``, three long tensors of length m on ``x``'s device; a Linear has one
        sample per image at row = col = 0.
    """
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        z = torch.zeros(b, dtype=torch.long)
        return torch.arange(b, device=x.device), z.to(x.device), z.to(x.device)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if positions_per_image >= ho * wo:
        pos = torch.arange(ho * wo).expand(b, -1)
    else:  # distinct positions per image: the first L of a random permutation of the map
        pos = torch.rand(b, ho * wo, generator=generator).argsort(dim=1)[:, :positions_per_image]
    img = torch.arange(b)[:, None].expand_as(pos).flatten()
    pos = pos.flatten()
    return img.to(x.device), (pos // wo).to(x.device), (pos % wo).to(x.device)


def extract_patches(
    module: nn.Module, x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor, torch.Tensor], channels: int
) -> torch.Tensor:
    """The consumer's receptive fields at the sampled positions: (m, C, k), k = kh * kw (or r for a Linear).

    ``patches[s, j] . weight[o, j]`` (taps flattened) is input channel j's contribution to output o at
    sample s, so the sum over j is the consumer's pre-bias output there.

    Args:
        module: the consumer (Conv2d or Linear).
        x: its input, (B, C, H, W) or (B, C * r).
        index: ``(image, row, col)`` from :func:`sample_positions`.
        channels: C, the number of channels the consumer reads.
    """
    img, row, col = index
    if isinstance(module, nn.Linear):
        # (B, C * r) -> (m, C, r): after a flatten, each channel owns r consecutive columns
        return x[img].reshape(img.numel(), channels, -1)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (B, H + 2ph, W + 2pw, C), a view of one padded copy
    taps_r = (torch.arange(kh, device=x.device) * dh).repeat_interleave(kw)  # (k,): tap a * kw + b -> row a
    taps_c = (torch.arange(kw, device=x.device) * dw).repeat(kh)  # -> col b
    rows = row[:, None] * sh + taps_r  # (m, k)
    cols = col[:, None] * sw + taps_c
    return xp[img[:, None], rows, cols].transpose(1, 2)  # (m, k, C) -> (m, C, k)


# ------------------------------------------------------------------------------ running the network


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def _input_of(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``path`` when ``model`` runs on ``x`` (the forward stops there)."""
    return _inputs_of(model, (path,), x)[0]


def _inputs_of(model: nn.Module, paths: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of several submodules in one forward pass, which stops once all of them have been seen."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.setdefault(path, args[0])
            if len(captured) == len(paths):
                raise _Stop

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in paths]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in captured]
    if missing:
        raise RuntimeError(f"{missing[0]} was not called in the forward pass of {type(model).__name__}")
    return [captured[p] for p in paths]


def residual_block_of(model: nn.Module, path: str) -> tuple[str, nn.Module] | None:
    """The residual block whose branch ends in the conv ``path`` (:class:`~lit_prune.models.base.ResidualBlock`:
    ``branch_end``, ``shortcut_output``, ``branch_affine``), or None when ``path`` does not end a branch."""
    block_path, _, leaf = path.rpartition(".")
    block = model.get_submodule(block_path) if block_path else model
    if getattr(block, "branch_end", None) == leaf and callable(getattr(block, "shortcut_output", None)):
        return block_path, block
    return None


def branch_affine(model: nn.Module, block_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float64 ``(a, b)``: a residual block's branch adds ``a * z + b`` for its end conv's output ``z``."""
    a, b = model.get_submodule(block_path).branch_affine()
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


def _images(batch: Any, device: torch.device) -> torch.Tensor:
    """The input tensor of a batch (a tensor, or the first element of an (inputs, targets) pair)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batches must be tensors or (inputs, targets) pairs, got {type(batch).__name__}")
    return batch.to(device)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- ThiNet


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
) -> GramStats:
    """ThiNet's statistics for ``group``: ``G = Xhat^T Xhat`` (C x C) and ``Xhat^T y`` (C x 1).

    Args:
        model: the current (possibly already partly pruned) network, in eval mode.
        group: the group whose channels the consumer reads.
        batches: images, or (images, targets) pairs.
        positions_per_image: output positions sampled per image (ThiNet uses 10).
        generator: seeded CPU generator for positions and output channels.
        reduce_fn: all-reduce (sum) applied to the accumulators after this process's images.
    """
    path, consumer = consumer_of(model, group)
    c = group_size(model, group)
    weight = _weight3(consumer, c)  # (n, C, k)
    stats = GramStats.zeros(c, 1, device=weight.device)
    device = _device(model)
    for batch in batches:
        x = _input_of(model, path, _images(batch, device))
        index = sample_positions(consumer, x, positions_per_image, generator)
        patches = extract_patches(consumer, x, index, c).to(weight.dtype)
        out = torch.randint(weight.shape[0], (patches.shape[0],), generator=generator).to(weight.device)
        xhat, y = thinet_contributions(weight, patches, out)
        stats.update(xhat, y)
    return stats.reduce(reduce_fn)


def thinet_greedy(gram: torch.Tensor, num_keep: int) -> torch.Tensor:
    """ThiNet's greedy removal (paper-spec 4.2 step 2) on the Gram matrix of the contributions.

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


def _ridge(block: torch.Tensor, ridge: float) -> float:
    """Absolute ridge: ``ridge`` times the mean diagonal of the Gram block (scale-free)."""
    return ridge * float(block.diagonal().mean().clamp_min(1e-30)) if block.numel() else 0.0


def thinet_scales(stats: GramStats, keep: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """ThiNet's least-squares rescaling (paper-spec 4.2 step 3) of the kept channels.

    Solves ``min_w sum (y - w^T xhat_S)^2 + lam ||w - 1||^2``: the ridge pulls towards 1 (plain removal),
    so a rank-deficient sample set leaves a channel's scale unchanged instead of zeroing it.

    Returns:
        (C,) float64 scales, 0 for removed channels.
    """
    keep = keep.to(torch.bool).to(stats.gram.device)
    idx = keep.nonzero().flatten()
    g = stats.gram[idx][:, idx]
    lam = _ridge(g, ridge)
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


# ------------------------------------------------------------------------------------ channel pruning


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
) -> GramStats:
    """He et al.'s statistics for ``group``: patch Gram ``X^T X`` ((C k) x (C k)) and ``X^T Y`` ((C k) x n).

    Args:
        model: the current (already pruned up to here) network, in eval mode: it gives the inputs X.
        group: the group whose channels the consumer reads.
        batches: images, or (images, targets) pairs.
        original: the unpruned network (same module paths, frozen) that gives the targets
            ``Y = W_orig x_orig`` (pre-bias) at the same positions (paper-spec 5.2 step 1); None takes them
            from ``model`` itself.
        positions_per_image: output positions sampled per image (He et al. use 10).
        generator: seeded CPU generator for the positions.
        reduce_fn: all-reduce (sum) applied to the accumulators after this process's images.
        compensate_shortcut: when the consumer ends a residual branch (:func:`residual_block_of`) and
            ``original`` is given, aim at ``Y1 + Y2 - Y2'`` (paper-spec 5.2 step 5): the original branch
            output plus the original shortcut minus the current network's shortcut, so that the refitted
            branch makes up for the error the shortcut already carries. These targets live where the two
            paths are added, after the end conv's BN and gate
            (:meth:`~lit_prune.models.base.ResidualBlock.branch_affine`: ``a z + b``): the original's
            ``a Y1 + b`` plus ``Y2 - Y2'``, minus the current network's ``b'`` (which differs from ``b`` once
            fine-tuning between layers has moved the BN), so the regressors' weights must be scaled by the
            current ``a'`` (:func:`channel_pruning_group` does).
    """
    path, consumer = consumer_of(model, group)
    c = group_size(model, group)
    weight = _weight3(consumer, c)
    residual = residual_block_of(model, path) if compensate_shortcut and original is not None else None
    if residual is not None:
        scale, shift = branch_affine(original, residual[0])
        shift = shift - branch_affine(model, residual[0])[1]  # b - b'
    if original is not None:
        ref_path, ref = consumer_of(original, group)
        ref_c = group_size(original, group)
        ref_weight = _weight3(ref, ref_c)  # (n, C_orig, k)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"{path} has {weight.shape[0]} outputs but {ref_weight.shape[0]} in the original "
                             "network; prune shallow to deep so that each consumer's outputs are still whole")
    if residual is not None:
        block_path, block = residual
        ref_block = original.get_submodule(block_path)
    stats = GramStats.zeros(c * weight.shape[2], weight.shape[0], device=weight.device)
    device = _device(model)
    for batch in batches:
        images = _images(batch, device)
        if residual is None:
            x = _input_of(model, path, images)
        else:
            x_block, x = _inputs_of(model, (block_path, path), images)
        index = sample_positions(consumer, x, positions_per_image, generator)
        patches = extract_patches(consumer, x, index, c).to(weight.dtype)  # (m, C, k)
        if original is None:
            target_patches, target_weight = patches, weight
        else:
            ref_images = images.to(_device(original))
            if residual is None:
                x_ref = _input_of(original, ref_path, ref_images)
            else:
                x_ref_block, x_ref = _inputs_of(original, (block_path, ref_path), ref_images)
            target_patches = extract_patches(ref, x_ref, tuple(t.to(x_ref.device) for t in index), ref_c)
            target_weight = ref_weight
        y = torch.einsum("mck,nck->mn", target_patches.to(target_weight.dtype), target_weight)  # (m, n)
        y = y.to(stats.gram.device, torch.float64)
        if residual is not None:
            # Y2 - Y2' at the sampled positions (the end conv's output map is the block's): (m, n)
            img, row, col = index
            sc = block.shortcut_output(x_block)[img, :, row, col]
            img, row, col = (t.to(x_ref_block.device) for t in index)
            sc_ref = ref_block.shortcut_output(x_ref_block)[img, :, row, col]
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
    """He et al.'s LASSO channel selection with a binary search on alpha (paper-spec 5.2 step 2).

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


def least_squares_weight(
    stats: GramStats, weight: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-4
) -> torch.Tensor:
    """Least-squares reconstruction of the consumer on the kept channels (paper-spec 5.2 step 3).

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
    lam = _ridge(h, ridge)
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


# ------------------------------------------------------------------------------------ one group at a time


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
    path, consumer = consumer_of(model, group)
    stats = collect_thinet_stats(model, group, batches, positions_per_image=positions_per_image,
                                 generator=generator, reduce_fn=reduce_fn)
    keep = thinet_greedy(stats.gram, num_keep)
    scales = thinet_scales(stats, keep, ridge)
    c = keep.numel()
    shape = (1, c) + (1,) * (consumer.weight.dim() - 2)
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):  # each channel owns r columns after the flatten
        factor = scales.repeat_interleave(w.shape[1] // c).reshape(1, -1)
    else:
        factor = scales.reshape(shape)
    weight = (w.to(torch.float64) * factor.to(w.device)).to(w.dtype)
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
            :func:`collect_regression_stats`).
    """
    path, consumer = consumer_of(model, group)
    stats = collect_regression_stats(model, group, batches, original=original,
                                     positions_per_image=positions_per_image, generator=generator,
                                     reduce_fn=reduce_fn, compensate_shortcut=compensate_shortcut)
    c = group_size(model, group)
    w = consumer.weight.detach()
    residual = residual_block_of(model, path) if compensate_shortcut and original is not None else None
    # With the shortcut compensation the targets are branch outputs after the BN: scale the weights by the
    # current network's a'. Each output's least squares is its own, so only the LASSO (shared beta) and the
    # errors see the scale.
    scale = torch.ones(w.shape[0], dtype=torch.float64) if residual is None else branch_affine(model, residual[0])[0]
    scale = scale.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
    w_out = (w.to(torch.float64) * scale).to(w.dtype)
    q_mat, q_vec = regression_lasso_problem(stats, w_out.reshape(w.shape[0], c, -1))
    keep, info = lasso_select(q_mat, q_vec, num_keep, rank_tol=rank_tol)
    plain = w * _column_mask(consumer, keep)
    fitted = least_squares_weight(stats, w_out, keep, ridge).to(torch.float64)
    # back to the conv's own weights; an output whose branch scale is (nearly) 0 is (nearly) never seen, and
    # dividing by it would blow its weights up: it keeps its weights, pruned
    live = scale.abs() > 1e-6 * scale.abs().max()
    weight = torch.where(live, fitted / torch.where(live, scale, 1.0), plain.to(torch.float64)).to(w.dtype)
    return Reconstruction(keep, weight, regression_error(stats, (plain.to(torch.float64) * scale).to(w.dtype)),
                          regression_error(stats, (weight.to(torch.float64) * scale).to(w.dtype)),
                          stats.samples, lasso=info)


def _column_mask(consumer: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    w = consumer.weight
    if isinstance(consumer, nn.Linear):
        return keep.repeat_interleave(w.shape[1] // keep.numel()).reshape(1, -1).to(w.device, w.dtype)
    return keep.reshape(1, -1, *([1] * (w.dim() - 2))).to(w.device, w.dtype)


@torch.no_grad()
def apply_reconstruction(model: nn.Module, group: ChannelGroup, rec: Reconstruction) -> None:
    """Write the consumer's new weight, then remove the group's dropped channels physically."""
    _, consumer = consumer_of(model, group)
    consumer.weight.copy_(rec.weight.to(consumer.weight.device, consumer.weight.dtype))
    prune_group(model, group, rec.keep)
