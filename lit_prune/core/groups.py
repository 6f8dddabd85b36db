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
any other model gets its groups from Torch-Pruning's dependency graph (:mod:`lit_prune.core.graph`),
described member by member (``members``: which indices of which tensor belong to which channel).
Group names are module paths, identical in an unpruned model and in any pruned version of it, which is
how a predefined target (e.g. ResNet-56-B) is turned into keep counts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
        members: for a group found by Torch-Pruning, every coupled tensor with the indices each channel
            owns in it (:class:`lit_prune.core.graph.Member`); surgery, masks and scores then follow these
            instead of ``producers``/``consumers`` (which still name the layers). Empty for zoo groups.
        attention: path of the attention block whose heads are this group's channels (its ``num_heads``
            follows the surgery).
    """

    name: str
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    selection: str | None = None
    bn: str | None = None
    conv: str | None = None
    branch: tuple[str, ...] = ()
    members: tuple[Any, ...] = ()
    attention: str | None = None


def channel_groups(model: nn.Module, input_size: Sequence[int] | None = None) -> list[ChannelGroup]:
    """The prunable groups of ``model``.

    Zoo models declare them through ``channel_groups()`` (they are
    :class:`~lit_prune.core.protocols.DeclaresChannelGroups`), which always takes precedence. Any other
    model gets them from Torch-Pruning's dependency graph
    (:func:`lit_prune.core.graph.tp_channel_groups`, at ``input_size``, default ``model.input_size`` or
    (3, 32, 32)), traced once per architecture: the result is kept for models with the same classes,
    module names and tensor shapes (a deep copy, a reloaded model), and surgery hands the pruned model its
    renumbered groups (:func:`remember`), so nothing is traced twice.

    Raises:
        TypeError: the model declares no groups and its forward fails on the example input.
    """
    if isinstance(model, DeclaresChannelGroups):
        return list(model.channel_groups())
    key = structure_key(model)
    if key not in _TRACED:
        from lit_prune.core.graph import tp_channel_groups  # imported here: graph imports this module

        remember(model, tp_channel_groups(model, input_size), key)
    _TRACED.move_to_end(key)
    return list(_TRACED[key])


#: traced groups by :func:`structure_key`, the most recent last (a few architectures at a time)
_TRACED: OrderedDict[tuple, list[ChannelGroup]] = OrderedDict()
_TRACED_MAX = 8


def structure_key(model: nn.Module) -> tuple:
    """What the traced groups depend on: the model's class, its modules (names, classes) and tensor shapes."""
    return (type(model).__qualname__,
            tuple((n, type(m).__qualname__) for n, m in model.named_modules()),
            tuple((n, None if nn.parameter.is_lazy(p) else tuple(p.shape)) for n, p in model.named_parameters()))


def remember(model: nn.Module, groups: list[ChannelGroup], key: tuple | None = None) -> None:
    """Record ``groups`` as the groups of ``model`` (surgery's renumbered groups of a pruned model)."""
    _TRACED[key if key is not None else structure_key(model)] = list(groups)
    while len(_TRACED) > _TRACED_MAX:
        _TRACED.popitem(last=False)


def group_size(model: nn.Module, group: ChannelGroup) -> int:
    """Current number of channels in ``group``."""
    if group.members:
        from lit_prune.core.graph import member_size

        return member_size(group)
    if group.selection is not None:
        return model.get_submodule(group.selection).indices.numel()
    m = model.get_submodule(group.producers[0])
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.num_features
