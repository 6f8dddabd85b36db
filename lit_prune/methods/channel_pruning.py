"""He et al.'s channel pruning (ICCV 2017), plain PyTorch: LASSO channel selection, then least-squares
reconstruction of the next layer, layer by layer (the walk is
:class:`~lit_prune.methods.reconstruction.LayerwiseReconstruction`'s; the callback, with the whole description,
is :class:`lit_prune.callbacks.ChannelPruning`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lit_prune.core.groups import ChannelGroup
from lit_prune.core.reconstruct import (
    ConsumerView,
    Reconstruction,
    ReduceFn,
    add_channel_samplers,
    channel_pruning_group,
)
from lit_prune.methods.reconstruction import LayerwiseReconstruction

#: largest patch-statistics side (C k) accepted: the Gram matrix is (C k)^2 float64 (16384 -> 2 GiB)
MAX_STATISTICS_DIM = 16384


class RegressionReconstruction(LayerwiseReconstruction):
    """LASSO selection and least-squares refits (arguments: see :class:`lit_prune.callbacks.ChannelPruning`)."""

    name = "channel_pruning"

    def __init__(
        self, *, rank_tol: float = 0.1, channel_sampler: bool = False, shortcut_compensation: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(**common)  # the walk's arguments (LayerwiseReconstruction)
        if isinstance(rank_tol, bool) or not isinstance(rank_tol, (int, float)) or rank_tol < 0:
            raise ValueError(f"rank_tol must be a number >= 0 (He et al. use 0.1), got {rank_tol!r}")
        self.rank_tol, self.channel_sampler = float(rank_tol), bool(channel_sampler)
        self.shortcut_compensation = bool(shortcut_compensation)

    @override
    def prepare(self, model: nn.Module) -> nn.Module:
        if self.channel_sampler:  # reads every channel until the LASSO prunes it; the shortcut keeps the full input
            add_channel_samplers(model)
        return model

    @override
    def reference(self, model: nn.Module) -> nn.Module:
        # docs/paper-settings.md §5.2 step 1: targets from the original network, so errors do not accumulate
        ref = self.prepare(copy.deepcopy(model)).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @override
    def reconstruct_group(
        self, model: nn.Module, reference: nn.Module | None, group: ChannelGroup, num_keep: int,
        batches: Any, generator: torch.Generator, reduce_fn: ReduceFn | None,
    ) -> Reconstruction:
        view = ConsumerView.of(model, group)
        dim = view.module.weight[0].numel()  # C k: one row of the patch statistics per channel and tap
        if dim > MAX_STATISTICS_DIM:
            raise ValueError(
                f"{group.name!r}: its consumer reads {view.channels} channels of "
                f"{dim // view.channels} taps; the ({dim} x {dim}) patch statistics would not fit. "
                f"Leave the layer whole (skip: [{group.name}]) or use ThiNetPruning, whose statistics are C x C"
            )
        return channel_pruning_group(
            model, group, batches, num_keep, original=reference, positions_per_image=self.positions_per_image,
            generator=generator, reduce_fn=reduce_fn, rank_tol=self.rank_tol, ridge=self.ridge,
            compensate_shortcut=self.shortcut_compensation,
        )
