"""The one structural surgery path: physically remove channels group by group.

Surgery edits modules in place (conv/BN/linear tensors and their size attributes, channel-selection
indices) and never rebuilds a model by hand. Zoo models read their width config back from the module
shapes, so afterwards ``architecture(model)`` describes the pruned weights and the artifact can rebuild
them with ``create_model``. Surgery changes parameter objects: run it between training stages, before
an optimizer or a DDP wrapper exists.

Groups found by Torch-Pruning (any model outside the zoo, :mod:`lit_prune.core.graph`) are cut member by
member: every tensor loses the indices of the removed channels of every group at once, our slicers for
convs, linears and BatchNorms, Torch-Pruning's own per-layer functions for the rest (depthwise and grouped
convs, LayerNorm, GroupNorm, PReLU, embeddings, ``nn.MultiheadAttention``), attention blocks keep
``num_heads`` equal to their weights, and a model that keeps its stream width as ``hidden_dim``
(torchvision's ViT) is told the new one. The pruned model's groups are then the old ones renumbered (no
second trace).

Such a model cannot read its widths back from data as a zoo model does, so surgery records what it cut on
the network itself (``lit_prune_edits``: per tensor, the indices kept along the pruned dimension, and the
attention blocks' new head counts), plain data an artifact stores. :func:`replay_edits` applies them to a
freshly built network through the same cutting code, so the rebuilt model has exactly the pruned shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup, channel_groups, group_size, remember, structure_key
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


def _slice_columns(module: nn.Module, cols: torch.Tensor) -> None:
    """Keep input columns ``cols`` of a (groups=1) conv or a linear layer."""
    w = module.weight
    module.weight = _param(w.detach().index_select(1, cols.to(w.device)), w)
    if isinstance(module, nn.Conv2d):
        module.in_channels = cols.numel()
    else:
        module.in_features = cols.numel()


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
    if group.members:  # a Torch-Pruning group: cut with the model's other groups renumbered
        listed = [g if g.name != group.name else group for g in channel_groups(model)]
        _prune_members(model, listed, {group.name: keep})
        return
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


def prune_groups(
    model: nn.Module, keeps: Mapping[str, torch.Tensor], groups: Sequence[ChannelGroup] | None = None
) -> None:
    """Apply :func:`prune_group` for every group named in ``keeps`` (group name -> keep vector).

    Args:
        groups: the model's groups when the caller has them (default :func:`channel_groups`).
    """
    listed = list(groups) if groups is not None else channel_groups(model)
    groups = {g.name: g for g in listed}
    unknown = sorted(set(keeps) - set(groups))
    if unknown:
        raise KeyError(f"no prunable group named {', '.join(unknown)} in {type(model).__name__}")
    if any(g.members for g in listed):
        _prune_members(model, listed, keeps)
        return
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


def _prune_members(model: nn.Module, listed: Sequence[ChannelGroup], keeps: Mapping[str, torch.Tensor]) -> None:
    """Cut the members of Torch-Pruning groups: each tensor once, with the removed indices of every group."""
    from lit_prune.core.graph import removed_indices, renumber

    groups = {g.name: g for g in listed}
    keeps = {n: k.to(torch.bool).cpu() for n, k in keeps.items()}
    for name, keep in keeps.items():
        size = group_size(model, groups[name])
        if keep.numel() != size:
            raise ValueError(f"group {name!r} has {size} channels but the keep mask has {keep.numel()}")
        check_not_emptied(name, int(keep.sum()), (), "lower the prune ratio or keep at least one channel per layer "
                          "(floor: 1)")
    removed = removed_indices(groups, keeps)
    edits: list[dict] = []
    widths = {}  # a stream width a model keeps as an attribute, before and after (torchvision ViT's hidden_dim)
    for name in keeps:
        first = next((m for m in groups[name].members if m.kind == "out"), None)
        if first is not None and (first.path, "out", 0) in removed:
            widths[first.path] = _extent(model, first.path, "out", 0)
    for (path, kind, dim), gone in removed.items():
        size = _extent(model, path, kind, dim)
        edits.append({"path": path, "kind": kind, "dim": dim, "size": size, "keep": _complement(size, gone)})
        _cut(model, path, kind, dim, gone)
    for path, before in widths.items():
        edits.extend(_follow_width(model, path, before, _extent(model, path, "out", 0)))
    for name, keep in keeps.items():
        path = groups[name].attention
        if path is not None:  # the weights changed; the block's head count must say so
            attn = model.get_submodule(path)
            attn.num_heads = int(keep.sum())
            edits.append({"path": path, "kind": "attr", "name": "num_heads", "value": attn.num_heads})
            if hasattr(attn, "attn_dim"):
                attn.attn_dim = attn.num_heads * attn.head_dim
                edits.append({"path": path, "kind": "attr", "name": "attn_dim", "value": attn.attn_dim})
    _record(model, edits)
    remember(model, renumber(listed, keeps, removed), structure_key(model))


def _follow_width(model: nn.Module, path: str, before: int, after: int) -> list[dict]:
    """Set the width attribute of the modules around ``path`` that held its old width (``hidden_dim``:
    torchvision's ``VisionTransformer`` reshapes its patches by it); the edits that did so."""
    edits = []
    parts = path.split(".")
    for owner in (".".join(parts[:i]) for i in range(len(parts))):
        m = model.get_submodule(owner)
        if getattr(m, "hidden_dim", None) == before:
            m.hidden_dim = after
            edits.append({"path": owner, "kind": "attr", "name": "hidden_dim", "value": after})
    return edits


#: where surgery records the edits it made to a network outside the zoo (:func:`edits_of`)
EDITS_ATTR = "lit_prune_edits"
#: the only module attributes an edit may set (an attention block's head count and width, a model's
#: stream width)
_EDIT_ATTRS = ("num_heads", "attn_dim", "hidden_dim")


def edits_of(model: nn.Module) -> list[dict]:
    """The cuts made to ``model`` so far, in order: ``{"path", "kind", "dim", "size", "keep"}`` per tensor
    (``keep``: the indices it kept of ``size`` along ``dim``) and ``{"path", "kind": "attr", "name", "value"}``
    per attention block (empty for an unpruned model or a zoo model, which describes its widths itself)."""
    return [dict(e) for e in getattr(model, EDITS_ATTR, None) or ()]


def _record(model: nn.Module, edits: list[dict]) -> None:
    done = getattr(model, EDITS_ATTR, None)
    if done is None:
        done = []
        object.__setattr__(model, EDITS_ATTR, done)  # plain data, not a submodule or buffer
    done.extend(edits)


def replay_edits(model: nn.Module, edits: Sequence[Mapping]) -> None:
    """Apply recorded edits (:func:`edits_of`) to a freshly built network of the same architecture.

    Only module paths, parameter names and the attributes of :data:`_EDIT_ATTRS` are looked up; nothing
    named by the edits is called. The edits are recorded on ``model`` again, so a pruned-again rebuilt model
    keeps its whole history.

    Raises:
        ValueError: an edit is malformed or does not fit ``model`` (another architecture was built).
    """
    for i, e in enumerate(edits):
        try:
            path, kind = e["path"], e["kind"]
            if kind == "attr":
                name, value = e["name"], e["value"]
                if name not in _EDIT_ATTRS or not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"an edit may only set {', '.join(_EDIT_ATTRS)} to an integer")
                setattr(model.get_submodule(path), name, value)
                continue
            dim, size, keep = int(e["dim"]), int(e["size"]), e["keep"]
            if kind not in ("out", "in", "param") or not isinstance(keep, torch.Tensor):
                raise ValueError(f"unknown kind {kind!r} or kept indices that are not a tensor")
            have = _extent(model, path, kind, dim)
        except (KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"edit {i} is malformed ({type(err).__name__}: {err}); re-run the pruning that wrote "
                             "it") from None
        if have != size:
            raise ValueError(f"edit {i} cuts {path} ({kind}) from {size} to {keep.numel()}, but the rebuilt model "
                             f"has {have} there: the builder built another architecture than the pruned one")
        gone = torch.ones(size, dtype=torch.bool)
        gone[keep.long()] = False
        _cut(model, path, kind, dim, gone.nonzero().flatten())
    _record(model, [dict(e) for e in edits])


def _extent(model: nn.Module, path: str, kind: str, dim: int) -> int:
    """The current size of the dimension a member's indices address."""
    if kind == "param":
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if name not in owner._parameters:
            raise AttributeError(f"{path} is not a parameter")
        p = owner._parameters[name]
        return int(p.shape[dim % p.dim()])
    import torch_pruning as tp
    from torch_pruning.pruner import function as tpf

    m = model.get_submodule(path)
    pruner = tpf.PrunerBox.get(tp.ops.module2type(m))
    if pruner is None:
        raise TypeError(f"{path} is a {type(m).__name__}, which neither lit-prune nor Torch-Pruning slices")
    return int(pruner.get_out_channels(m) if kind == "out" else pruner.get_in_channels(m))


def _cut(model: nn.Module, path: str, kind: str, dim: int, gone: torch.Tensor) -> None:
    """Remove indices ``gone`` of one member: our slicers where they apply, Torch-Pruning's functions otherwise."""
    from torch_pruning.pruner import function as tpf

    from lit_prune.core.graph import is_depthwise

    if kind == "param":
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        p = getattr(owner, name)
        d = dim % p.dim()
        keep = _complement(p.shape[d], gone)
        setattr(owner, name, _param(p.detach().index_select(d, keep.to(p.device)), p))
        return
    m = model.get_submodule(path)
    plain = isinstance(m, (nn.Linear, nn.modules.batchnorm._BatchNorm)) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    if plain and kind == "out":
        _slice_out(m, _complement(m.weight.shape[0] if m.weight is not None else m.num_features, gone))
    elif plain:
        _slice_columns(m, _complement(m.weight.shape[1], gone))
    elif is_depthwise(m):  # its filters are its inputs
        tpf.prune_depthwise_conv_out_channels(m, gone.tolist())
    elif isinstance(m, nn.Conv2d):  # grouped: the same positions go from every slice (graph._tie_conv_groups)
        (tpf.prune_conv_out_channels if kind == "out" else tpf.prune_conv_in_channels)(m, gone.tolist())
    else:
        import torch_pruning as tp

        pruner = tpf.PrunerBox.get(tp.ops.module2type(m))
        if pruner is None:
            raise TypeError(f"cannot cut {path} ({type(m).__name__}): neither lit-prune nor Torch-Pruning slices it")
        (pruner.prune_out_channels if kind == "out" else pruner.prune_in_channels)(m, gone.tolist())


def _complement(size: int, gone: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[gone] = False
    return keep.nonzero().flatten()
