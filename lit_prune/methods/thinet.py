"""ThiNet's layer decision (Luo et al., ICCV 2017), plain PyTorch: greedy channel removal by the next layer's
reconstruction error, then least-squares rescaling (:func:`lit_prune.core.reconstruct.thinet_group`). The walk is
:class:`~lit_prune.methods.reconstruction.LayerwiseReconstruction`'s; the callback is
:class:`lit_prune.callbacks.ThiNetPruning`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lit_prune.core.groups import ChannelGroup
from lit_prune.core.reconstruct import Reconstruction, ReduceFn, thinet_group
from lit_prune.methods.reconstruction import LayerwiseReconstruction


class ThiNetReconstruction(LayerwiseReconstruction):
    """ThiNet, layer by layer (arguments: those of :class:`LayerwiseReconstruction`)."""

    name = "thinet"

    @override
    def reconstruct_group(
        self, model: nn.Module, reference: nn.Module | None, group: ChannelGroup, num_keep: int,
        batches: Any, generator: torch.Generator, reduce_fn: ReduceFn | None,
    ) -> Reconstruction:
        return thinet_group(model, group, batches, num_keep, positions_per_image=self.positions_per_image,
                            generator=generator, reduce_fn=reduce_fn, ridge=self.ridge)
