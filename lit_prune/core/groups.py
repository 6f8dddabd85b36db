"""Prunable channel groups: the channels of one tensor, with every layer that must change with them.

Structured pruning never thinks in layers, only in groups. A group names

* ``producers``: modules whose *output* channels are the group's channels (a conv's filters, its
  BatchNorm, a linear layer's rows) -- sliced on dim 0 by surgery, zeroed by a mask;
* ``consumers``: modules that *read* the channels (the next conv's input slices, a linear layer's
  columns, possibly several columns per channel after a flatten) -- sliced on dim 1;
* ``selection``: for a stream that cannot change width (a residual stream, a dense concatenation), the
  :class:`~lit_prune.models.base.ChannelSelection` through which the consumers read it. Pruning then
  shrinks the selection's indices and the consumers' inputs; the stream and its BN keep full width.

Zoo models declare their groups (``model.channel_groups()``), so one surgery path serves every family;
any other model gets the groups that a traced forward pass proves safe (:mod:`lit_prune.core.trace`).
Group names are module paths, identical in an unpruned model and in any pruned version of it, which is
how a predefined target (e.g. ResNet-56-B) is turned into keep counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lit_prune.core.protocols import DeclaresChannelGroups


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels pruned together.

    Attributes:
        name: stable id (the producing conv's, or the selection's, module path).
        producers: module paths whose output channels these are.
        consumers: module paths that read these channels.
        selection: path of the ChannelSelection the consumers read through, if any.
        bn: path of the BatchNorm normalising these channels (Network Slimming scores its gamma).
        conv: path of the conv producing them (L1/L2 filter criteria score its weight).
        branch: module paths of a residual branch that disappears when the group is pruned to zero
            channels (the block becomes its shortcut). Empty for a plain chain, which may not reach zero.
    """

    name: str
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    selection: str | None = None
    bn: str | None = None
    conv: str | None = None
    branch: tuple[str, ...] = ()


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The prunable groups of ``model``.

    Zoo models declare them through ``channel_groups()`` (they are
    :class:`~lit_prune.core.protocols.DeclaresChannelGroups`), which always takes precedence. Any other
    model gets them from :func:`lit_prune.core.trace.trace_channel_groups` (torch.fx tracing, a conservative
    rule: only convs whose channels reach nothing but the next conv or linear layer; input size
    ``model.input_size`` or (3, 32, 32)).

    Raises:
        TypeError: the model declares no groups and its forward cannot be traced.
    """
    if isinstance(model, DeclaresChannelGroups):
        return list(model.channel_groups())
    from lit_prune.core.trace import trace_channel_groups  # imported here: trace imports this module

    return trace_channel_groups(model)


def group_size(model: nn.Module, group: ChannelGroup) -> int:
    """Current number of channels in ``group``."""
    if group.selection is not None:
        return model.get_submodule(group.selection).indices.numel()
    m = model.get_submodule(group.producers[0])
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.num_features
