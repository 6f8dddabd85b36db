"""The one structural surgery path: physically remove channels group by group.

Surgery edits modules in place (conv/BN/linear tensors and their size attributes, channel-selection
indices) and never rebuilds a model by hand. Zoo models read their width config back from the module
shapes, so afterwards ``architecture(model)`` describes the pruned weights and the artifact can rebuild
them with ``create_model``. Surgery changes parameter objects: run it between training stages, before
an optimizer or a DDP wrapper exists.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup, channel_groups, group_size
from lit_prune.core.protocols import CompactsBlocks
from lit_prune.core.selection import check_not_emptied


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


def _slice_out(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep output channels ``idx`` of a conv, linear or BatchNorm."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None:
            setattr(module, name, _param(p.detach().index_select(0, idx.to(p.device)), p))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is not None:
            module.running_mean = module.running_mean.index_select(0, idx.to(module.running_mean.device))
            module.running_var = module.running_var.index_select(0, idx.to(module.running_var.device))
        module.num_features = idx.numel()
    elif isinstance(module, nn.Conv2d):
        module.out_channels = idx.numel()
    elif isinstance(module, nn.Linear):
        module.out_features = idx.numel()
    else:
        raise TypeError(f"cannot slice the outputs of a {type(module).__name__}")


def _slice_in(module: nn.Module, idx: torch.Tensor, size: int) -> None:
    """Keep input channels ``idx`` (of ``size``) of a conv or linear layer."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError("grouped convolutions are not supported as consumers")
        module.weight = _param(w.detach().index_select(1, idx.to(w.device)), w)
        module.in_channels = idx.numel()
    elif isinstance(module, nn.Linear):
        # After a flatten each channel owns `repeat` consecutive columns (e.g. 7*7 for ImageNet VGG).
        repeat, rest = divmod(module.in_features, size)
        if rest:
            raise ValueError(f"linear layer with {module.in_features} inputs cannot read {size} channels")
        cols = (idx[:, None] * repeat + torch.arange(repeat)).flatten()
        module.weight = _param(w.detach().index_select(1, cols.to(w.device)), w)
        module.in_features = cols.numel()
    else:
        raise TypeError(f"cannot slice the inputs of a {type(module).__name__}")


def _remove(model: nn.Module, path: str) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, None)


def prune_group(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Physically remove the channels of ``group`` where ``keep`` is False.

    Raises:
        ValueError: ``keep`` has the wrong length, or it removes every channel of a plain chain (only a
            residual branch may vanish: its block then becomes its shortcut).
    """
    size = group_size(model, group)
    keep = keep.to(torch.bool).cpu()
    if keep.numel() != size:
        raise ValueError(f"group {group.name!r} has {size} channels but the keep mask has {keep.numel()}")
    idx = keep.nonzero().flatten()
    if idx.numel() == size:
        return
    if idx.numel() == 0:
        check_not_emptied(group.name, 0, group.branch, "lower the prune ratio or keep at least one channel per layer "
                          "(floor: 1)")
        for path in group.branch:
            _remove(model, path)
        return
    if group.selection is not None:
        sel = model.get_submodule(group.selection)
        sel.indices = sel.indices.index_select(0, idx.to(sel.indices.device))
    for path in group.producers:
        _slice_out(model.get_submodule(path), idx)
    for path in group.consumers:
        _slice_in(model.get_submodule(path), idx, size)


def prune_groups(model: nn.Module, keeps: Mapping[str, torch.Tensor]) -> None:
    """Apply :func:`prune_group` for every group named in ``keeps`` (group name -> keep vector)."""
    groups = {g.name: g for g in channel_groups(model)}
    unknown = sorted(set(keeps) - set(groups))
    if unknown:
        raise KeyError(f"no prunable group named {', '.join(unknown)} in {type(model).__name__}")
    # A residual branch pruned to nothing disappears whole; its other groups need no slicing first.
    vanishing = {n for n, k in keeps.items() if groups[n].branch and not bool(k.any())}
    gone = {path for n in vanishing for path in groups[n].branch}
    for name, keep in keeps.items():
        g = groups[name]
        if name not in vanishing and not gone.intersection(g.producers + g.consumers):
            prune_group(model, g, keep)
    for name in vanishing:
        if not gone.isdisjoint(groups[name].branch):
            prune_group(model, groups[name], keeps[name])
            gone.difference_update(groups[name].branch)
    if vanishing:
        compact_blocks(model)


def compact_blocks(model: nn.Module) -> None:
    """Renumber the blocks of a model whose block names must stay contiguous after a residual branch was
    removed (a :class:`~lit_prune.core.protocols.CompactsBlocks`); any other model is left as it is."""
    if isinstance(model, CompactsBlocks):
        model.compact_blocks()
