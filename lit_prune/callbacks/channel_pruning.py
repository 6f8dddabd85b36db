"""Channel pruning by LASSO selection and least-squares reconstruction (He, Zhang, Sun, "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017, arXiv:1707.06168).

Layer by layer, shallow to deep (paper-spec 5.2): for the channels that layer i+1 reads, sample random
output positions of layer i+1 on training images. The inputs X come from the *current* network (already
pruned up to here), the targets Y from a frozen copy of the *original* network, so errors do not accumulate.
A LASSO on one coefficient per input channel (each channel's contribution ``Z_i`` to all outputs, flattened)
selects the channels; its alpha is found by binary search until between c' and 1.1 c' coefficients are
non-zero (He et al.'s window; bracketed from above, see :func:`lit_prune.core.reconstruct.lasso_select`) and
exactly c' channels are kept (largest |beta|). Layer i+1's weights on them are then refitted by least
squares, and layer i's filters (with BN) and layer i+1's input slices are removed physically. Everything is
computed from Gram statistics of the samples (:mod:`lit_prune.core.reconstruct`): He et al.'s code
subsamples 400 rows for its sklearn LASSO; here the quadratic form of all samples costs the same.

ResNets (paper-spec 5.2 step 5): only conv1 and conv2 of each bottleneck are pruned (their groups; the
block output meets the shortcut). With ``channel_sampler: true`` every block also gets a channel sampler:
a channel selection in front of its first conv, chosen by the same LASSO with conv1 as the consumer (the
shortcut still reads every channel), as in ResNet-50-2x (``target: 2x`` brings its counts). When the
consumer is the last conv of a residual branch, its target is ``Y1 + Y2 - Y2'`` (``shortcut_compensation``,
on by default): the original branch output plus the original shortcut minus the pruned network's shortcut,
so the refitted branch also makes up for the error that earlier layers left on the residual stream.
Fine-tuning between layers is optional (``finetune_steps``); He et al. fine-tune once at the end: fine-tune
the artifact afterwards (the paper's "fine-tuned" regime).

YAML (VGG-16 -> VGG-16-5x at the end of training)::

    trainer:
      callbacks:
        - class_path: callbacks.ChannelPruning
          init_args:
            target: 5x
            num_images: 5000
            positions_per_image: 10

Prune a trained checkpoint instead::

    python -m lit_prune.prune --checkpoint runs/vgg16/last.ckpt --config cp.yaml \\
        --data-config configs/imagenet/vgg16.yaml --out vgg16_5x.pt
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lit_prune.callbacks.reconstruction import ReconstructionPruning
from lit_prune.core.groups import ChannelGroup
from lit_prune.core.reconstruct import (
    ConsumerView,
    Reconstruction,
    ReduceFn,
    add_channel_samplers,
    channel_pruning_group,
)

#: largest patch-statistics side (C k) accepted: the Gram matrix is (C k)^2 float64 (16384 -> 2 GiB)
MAX_STATISTICS_DIM = 16384


class ChannelPruning(ReconstructionPruning):
    """He et al.'s channel pruning: LASSO channel selection, then least-squares reconstruction of the next layer.

    Args:
        rank_tol: the search stops once the non-zero count lies in [c', c' (1 + rank_tol)] (He et al.: 0.1).
        channel_sampler: add a channel selection in front of each residual block's first conv and prune it
            too (ImageNet ResNets of the zoo only; the 2x configuration). Their keep counts come from ``target``
            or ``prune_ratio`` (a single ratio applies to them too; a pattern such as ``"*.select"`` addresses
            them alone).
        shortcut_compensation: reconstruct the last conv of a residual branch against ``Y1 + Y2 - Y2'``
            (paper-spec 5.2 step 5) instead of the original branch output ``Y1`` alone.
        **kwargs: the arguments of :class:`~callbacks.reconstruction.ReconstructionPruning` (``target`` or
            ``prune_ratio``, ``layers``, ``skip``, ``num_images``, ``positions_per_image``, ``seed``,
            ``batch_size``, ``ridge``, ``finetune_steps``, ``finetune_lr``, ``finetune_weight_decay``,
            ``artifact_path``).
    """

    method = "channel_pruning"

    def __init__(
        self,
        target: str | None = None,
        prune_ratio: float | dict[str, float] | None = None,
        layers: list[str] | None = None,
        skip: list[str] | None = None,
        num_images: int = 5000,
        positions_per_image: int = 10,
        seed: int = 0,
        batch_size: int | None = None,
        ridge: float = 1e-4,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        finetune_weight_decay: float = 1e-4,
        rank_tol: float = 0.1,
        channel_sampler: bool = False,
        shortcut_compensation: bool = True,
        artifact_path: str | None = "pruned.pt",
    ) -> None:
        super().__init__(target=target, prune_ratio=prune_ratio, layers=layers, skip=skip, num_images=num_images,
                         positions_per_image=positions_per_image, seed=seed, batch_size=batch_size, ridge=ridge,
                         finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                         finetune_weight_decay=finetune_weight_decay, artifact_path=artifact_path)
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
        # paper-spec 5.2 step 1: targets from the original network, so errors do not accumulate
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
