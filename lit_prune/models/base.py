"""Pieces every zoo family shares: the base class and the channel-selection layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class ZooModel(nn.Module):
    """Base class of zoo models.

    A subclass builds itself from a width config and implements :meth:`arch_kwargs`, which reads the
    *current* module shapes back into constructor arguments. After physical surgery the model is
    therefore still described by data (see :func:`lit_prune.models.architecture`). Built by
    :func:`~lit_prune.models.create_model`, it is a :class:`lit_prune.core.protocols.ZooModel` (test it with
    :func:`lit_prune.core.protocols.is_zoo_model`, not with this class).
    """

    #: (C, H, W) of one input image at the family's native resolution.
    input_size: tuple[int, int, int] = (3, 32, 32)

    def arch_kwargs(self) -> dict[str, Any]:
        """Constructor arguments (``cfg``, ``select``, ...) that rebuild the current shapes."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Re-initialise every weight with the family's own scheme (docs/paper-settings.md §1.5)."""
        raise NotImplementedError


class ResidualBlock(nn.Module):
    """A residual block whose branch ends in one conv: ``out = act(shortcut(x) + a * conv_end(h) + b)``.

    The zoo's implementation of :class:`lit_prune.core.protocols.ResidualBlock` (core tests that protocol, not
    this class): subclasses name their end conv and its BN and implement :meth:`shortcut_output`.

    ``a`` and ``b`` (per output channel) are what the branch does to the end conv's output before the addition,
    in eval mode: the following BN (none in a pre-activation block) times an SSS gate. He et al.'s channel
    pruning reads these terms to reconstruct ``branch_end`` against a target that also makes up for the error
    the pruned network already carries on the shortcut (docs/paper-settings.md §5.2 step 5).
    """

    #: attribute name of the conv whose output meets the shortcut
    branch_end: str = "conv2"
    #: attribute name of the BatchNorm right after it (None: the conv output is added directly)
    branch_end_bn: str | None = "bn2"

    def shortcut_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the block adds to its branch for block input ``x``: (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""
        raise NotImplementedError

    @torch.no_grad()
    def branch_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``, each (C_out,): the branch adds ``a * z + b`` for an end-conv output ``z`` (eval mode)."""
        conv = getattr(self, self.branch_end)
        scale = torch.ones(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        shift = torch.zeros_like(scale)
        bn = getattr(self, self.branch_end_bn) if self.branch_end_bn else None
        if bn is not None:  # gamma (z - mean) / sqrt(var + eps) + beta
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - scale * bn.running_mean
        gate = getattr(self, "gate", None)
        return (scale, shift) if gate is None else (scale * gate.weight, shift * gate.weight)


class ChannelSelection(nn.Module):
    """Passes on a fixed subset of its input channels (Network Slimming's ``channel_selection``).

    It sits after a BatchNorm whose width cannot change (a residual stream or a dense
    concatenation) and lets the next conv read only some of those channels. Unlike the reference code,
    the kept indices are a persistent *buffer*, never a parameter (docs/paper-settings.md §12.15).

    Args:
        num_channels: width of the incoming tensor.
        indices: kept channels in increasing order; None keeps all.
    """

    def __init__(self, num_channels: int, indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_channels = num_channels
        idx = torch.arange(num_channels) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_channels):
            raise ValueError(f"channel selection indices must lie in [0, {num_channels}), got {idx.tolist()}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("channel selection indices must be strictly increasing")
        self.register_buffer("indices", idx)

    @property
    def selects_all(self) -> bool:
        return self.indices.numel() == self.num_channels

    def kept(self) -> list[int] | None:
        """Kept indices as a list, or None when every channel is kept (the compact form for configs)."""
        return None if self.selects_all else self.indices.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, num_channels, H, W) -> (N, len(indices), H, W)
        return x if self.selects_all else x.index_select(1, self.indices)

    def extra_repr(self) -> str:
        return f"{self.indices.numel()}/{self.num_channels}"


def check_select(
    select: Sequence[Sequence[int] | None] | None,
    widths: list[int],
    channel_selection: bool,
    name: str,
    points: str,
) -> list[list[int] | None]:
    """Validate a ``select`` argument (one index list or None per selection point) against the widths of
    the streams it selects from; returns one entry per point, None meaning every channel.

    Args:
        points: what the selection points are, for the error message (e.g. "one per block, then the final one").
    """
    if select is None:
        return [None] * len(widths)
    if not channel_selection:
        raise ValueError(f"{name} was built without channel selection, so select must be None")
    select = list(select)
    if len(select) != len(widths):
        raise ValueError(
            f"{name} has {len(widths)} channel selections ({points}), so select needs {len(widths)} entries "
            f"(None = keep all), got {len(select)}"
        )
    out: list[list[int] | None] = []
    for i, (idx, c) in enumerate(zip(select, widths, strict=True)):
        if idx is None:
            out.append(None)
            continue
        idx = list(idx)
        ok = all(not isinstance(j, bool) and isinstance(j, int) and 0 <= j < c for j in idx)
        if not ok or any(a >= b for a, b in zip(idx, idx[1:], strict=False)):
            raise ValueError(f"{name}: select[{i}] must be strictly increasing channel indices in [0, {c}), got {idx}")
        out.append(idx)
    return out
