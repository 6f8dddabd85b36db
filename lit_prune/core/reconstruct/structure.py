"""Model-structure queries of reconstruction pruning: a group's consumer, seen once per group.

:class:`ConsumerView` is what the methods need to know about the layer that reads a group's channels: the
layer, how many channels it reads, and the residual block whose branch it ends (if any). One view is built per
group (:meth:`ConsumerView.of`) and handed down, instead of every step looking the consumer up again. The
structure is read through the protocols of :mod:`lit_prune.core.protocols`, never by attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup, group_size
from lit_prune.core.protocols import ChannelSamplers, ResidualBlock


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
    reader = next((r for r in group.members if r.path == path and r.kind == "in"), None)
    if reader is not None and (reader.idx != reader.roots or len(reader.idx) != m.weight.shape[1]):
        raise ValueError(f"{path} reads {group.name!r} through an index map (a concatenation or a flatten); "
                         "reconstruction needs a consumer that reads exactly the group's channels, in order")
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"{path}: only ungrouped convs with numeric zero padding can be reconstructed")
    elif not isinstance(m, nn.Linear):
        raise ValueError(f"{path} is a {type(m).__name__}; reconstruction needs a Conv2d or Linear consumer")
    return path, m


def residual_block_of(model: nn.Module, path: str) -> tuple[str, ResidualBlock] | None:
    """The residual block whose branch ends in the conv ``path`` (a :class:`~lit_prune.core.protocols.ResidualBlock`
    whose ``branch_end`` is ``path``'s last name), or None when ``path`` does not end a branch."""
    block_path, _, leaf = path.rpartition(".")
    block = model.get_submodule(block_path) if block_path else model
    if isinstance(block, ResidualBlock) and block.branch_end == leaf:
        return block_path, block
    return None


def branch_affine(model: nn.Module, block_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float64 ``(a, b)``: a residual block's branch adds ``a * z + b`` for its end conv's output ``z``."""
    return _affine64(model.get_submodule(block_path))


def _affine64(block: ResidualBlock) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = block.branch_affine()
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


@dataclass(frozen=True, eq=False)
class ConsumerView:
    """A group's consumer as reconstruction sees it, computed once per group (:meth:`of`).

    Attributes:
        path: the consumer's module path.
        module: the consumer, a plain Conv2d or a Linear (checked by :func:`consumer_of`).
        channels: C, the group's channels the consumer reads.
        block_path: the residual block whose branch the consumer ends (None: it does not end one).
        block: that block (a :class:`~lit_prune.core.protocols.ResidualBlock`), or None.
    """

    path: str
    module: nn.Module
    channels: int
    block_path: str | None = None
    block: ResidualBlock | None = None

    @classmethod
    def of(cls, model: nn.Module, group: ChannelGroup) -> ConsumerView:
        """The view of ``group``'s consumer in ``model`` (raises as :func:`consumer_of`)."""
        path, module = consumer_of(model, group)
        residual = residual_block_of(model, path)
        block_path, block = residual if residual is not None else (None, None)
        return cls(path, module, group_size(model, group), block_path, block)

    @property
    def ends_branch(self) -> bool:
        """Whether the consumer's output meets a shortcut (it is the ``branch_end`` of a residual block)."""
        return self.block is not None

    @property
    def outputs(self) -> int:
        """n, the consumer's outputs (dim 0 of its weight)."""
        return self.module.weight.shape[0]

    def weight3(self) -> torch.Tensor:
        """The consumer's weight as (n, C, k): k kernel taps of a conv, or the columns per channel of a linear."""
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], self.channels, -1)

    def per_input(self, values: torch.Tensor) -> torch.Tensor:
        """Per-channel ``values`` (C,) shaped to broadcast over the consumer's weight (dtype and device kept)."""
        w = self.module.weight
        if isinstance(self.module, nn.Linear):  # each channel owns r columns after the flatten
            return values.repeat_interleave(w.shape[1] // values.numel()).reshape(1, -1)
        return values.reshape(1, -1, *([1] * (w.dim() - 2)))

    def column_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep`` (C,) over the consumer's weight: 1 on the kept channels' slices, 0 elsewhere (its dtype)."""
        w = self.module.weight
        return self.per_input(keep).to(w.device, w.dtype)

    def branch_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) float64 ``(a, b)`` of the block whose branch the consumer ends (see :func:`branch_affine`)."""
        if self.block is None:
            raise ValueError(f"{self.path} does not end a residual branch")
        return _affine64(self.block)


def add_channel_samplers(model: nn.Module) -> int:
    """Give every residual branch of ``model`` a channel sampler (an all-channel input selection) it lacks.

    He et al.'s ResNet-50-2x: the selection in front of a block's first conv is then pruned like any other
    group (its consumer is that conv), while the shortcut keeps reading every channel. Only models that
    implement :class:`~lit_prune.core.protocols.ChannelSamplers` can hold them, because their architecture
    description must rebuild the selections from the artifact.

    Returns:
        The number of samplers added.

    Raises:
        ValueError: the model cannot hold channel samplers.
    """
    if not isinstance(model, ChannelSamplers):
        raise ValueError(f"channel_sampler needs an ImageNet ResNet of the zoo (resnet34, resnet50, ...), "
                         f"not a {type(model).__name__}")
    return model.add_channel_samplers()
