"""Channel groups of any model from Torch-Pruning's ``DependencyGraph``, as our :class:`ChannelGroup`.

Zoo models declare their groups (the paper's rules: channel selections, option-A shortcuts, residual
branches that may vanish). Every other network -- a torchvision or timm model, a researcher's own --
gets its groups from Torch-Pruning (Fang et al., "DepGraph", CVPR 2023), the field's standard engine:
it follows the autograd graph of one forward pass and couples every layer that must change together, so
a residual stream is one group with every conv, BN and shortcut that writes or reads it, a depthwise conv
goes with its producer, a concatenation maps each producer's channels to its offsets in every reader,
a squeeze-excite's expand conv goes with the channels it gates, and a ConvNeXt/ViT stream takes its
LayerNorms and layer-scale parameters along.

Each Torch-Pruning group (one per root conv/linear layer) becomes one :class:`ChannelGroup` whose
``members`` say, for every coupled tensor, which of its indices belong to which channel of the group
(Torch-Pruning's ``root_idxs``): surgery, masks and importance all work from these lists, so a
Torch-Pruning group never needs its graph again -- the model is traced once, and after surgery the
lists are renumbered instead of traced anew (:func:`renumber`).

Attention: a timm ``Attention`` block (``qkv``, ``proj``, ``num_heads``, ``head_dim``) gets one group
whose channels are its *heads* (each head owns ``3 * head_dim`` rows of ``qkv`` and ``head_dim``
columns of ``proj``); surgery keeps ``num_heads``/``attn_dim`` equal to what the weights say. The qkv
rows Torch-Pruning would couple one by one (q, k and v of a head dim must go together) are not offered.

Some layers can only lose the same positions of each of their equal slices: a grouped convolution that
is not depthwise (RegNet's, ResNeXt's) of each of its groups, a GroupNorm of each of its groups, and an
``nn.MultiheadAttention`` (torchvision's ViT, whose stream width is ``num_heads * head_dim``) of each head,
so that it keeps its heads and loses head dims with its stream. The channels at one position are tied into
one channel of the group (:func:`_tie_slices`), as Torch-Pruning's pruner ranks them together.

Refused, and logged at DEBUG level (the layers keep their width): groups that reach the model's output
(the classifier's logits), and groups through a layer we cannot cut exactly -- LSTMs and other RNNs, and
an ``nn.MultiheadAttention`` whose keys and values have their own widths.

Masks: a masked group equals the physically pruned model (the design's invariant) wherever its channels
pass through BatchNorm, convs, linears and element-wise ops. A LayerNorm normalises over all channels, so
zeroing some of them changes the statistics of the rest (a GroupNorm likewise within each of its groups),
and an ``nn.MultiheadAttention`` scales its scores by ``1 / sqrt(head_dim)``, which pruning changes: for a
group with such a member (ConvNeXt and ViT streams) the masked model is an approximation of the pruned one;
:func:`mask_exact` says which.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (3, 32, 32)
IMAGENET_INPUT_SIZE = (3, 224, 224)

#: what a member's indices address: the module's outputs (dim 0 of its tensors), a conv/linear's inputs
#: (dim 1 of its weight), or a bare parameter along ``dim``
KINDS = ("out", "in", "param")


@dataclass(frozen=True)
class Member:
    """One tensor of a group: which of its indices belong to which channel of the group.

    Attributes:
        path: module path (``layer1.0.conv1``) or, for ``kind == "param"``, the parameter's name.
        kind: one of :data:`KINDS`.
        idx: indices along the member's pruned dimension.
        roots: for each entry of ``idx``, the group channel it belongs to.
        dim: the pruned dimension of a bare parameter (-1 for the last one); 0 otherwise.
    """

    path: str
    kind: str
    idx: tuple[int, ...]
    roots: tuple[int, ...]
    dim: int = 0


#: the norms whose per-channel scales a group's channels own (Network Slimming's criterion scores them)
SCALE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.out_channels == m.in_channels and m.groups > 1


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (RegNet's, ResNeXt's): each of its ``groups`` reads and writes
    its own slice of channels, so it can only lose the same positions of every slice."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m)


def _slices(m: nn.Module, kind: str) -> tuple[int, int] | None:
    """(width, count) of the equal slices whose same positions ``m`` can only lose together, or None: a
    grouped conv's groups, an ``nn.MultiheadAttention``'s heads (its stream width is ``heads * head_dim``),
    a GroupNorm's groups."""
    if is_grouped(m):
        return (m.out_channels if kind == "out" else m.in_channels) // m.groups, m.groups
    if isinstance(m, nn.MultiheadAttention):
        return m.head_dim, m.num_heads
    if isinstance(m, nn.GroupNorm):
        return m.num_channels // m.num_groups, m.num_groups
    return None


def _cuttable(m: nn.Module) -> str | None:
    """Why module ``m`` cannot be cut exactly, or None."""
    if isinstance(m, nn.MultiheadAttention) and not m._qkv_same_embed_dim:
        return "MultiheadAttention with its own key/value widths"
    if isinstance(m, (nn.LSTM, nn.RNNBase)):
        return type(m).__name__
    return None


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """timm-style attention blocks whose heads can be pruned: ``{path: module}``."""
    out = {}
    for path, m in model.named_modules():
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        heads, hd = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)
                and isinstance(hd, int)):
            continue
        plain = all(isinstance(getattr(m, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        if qkv.out_features == 3 * heads * hd and proj.in_features == heads * hd and plain \
                and getattr(m, "gate", None) is None:
            out[path] = m
    return out


def head_group(path: str, attn: nn.Module) -> ChannelGroup:
    """The heads of one attention block as a group: head ``h`` owns rows ``s * H * d + h * d + j`` of qkv
    (s = q, k, v) and columns ``h * d + j`` of proj (d = head_dim)."""
    heads, hd = attn.num_heads, attn.head_dim
    rows = torch.arange(3 * heads * hd)
    row_heads = (rows % (heads * hd)) // hd
    cols = torch.arange(heads * hd)
    members = (Member(f"{path}.qkv", "out", tuple(rows.tolist()), tuple(row_heads.tolist())),
               Member(f"{path}.proj", "in", tuple(cols.tolist()), tuple((cols // hd).tolist())))
    return ChannelGroup(name=f"{path}.heads", producers=(f"{path}.qkv",), consumers=(f"{path}.proj",),
                        conv=f"{path}.qkv", members=members, attention=path)


def _example(model: nn.Module, input_size: Sequence[int] | None) -> list[torch.Tensor]:
    p = next(model.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None and p.is_floating_point() else {}
    if input_size is not None:
        sizes = [tuple(input_size)]
    elif getattr(model, "input_size", None) is not None:
        sizes = [tuple(model.input_size)]
    else:  # the CIFAR size first; an ImageNet-only model (AlexNet, a ViT with a fixed patch grid) needs 224
        sizes = [DEFAULT_INPUT_SIZE, IMAGENET_INPUT_SIZE]
    return [torch.zeros(1, *s, **kw) for s in sizes]


def dependency_graph(model: nn.Module, input_size: Sequence[int] | None = None):
    """Torch-Pruning's dependency graph of ``model``, from one forward pass in eval mode (BN statistics and
    training flags unchanged).

    Raises:
        TypeError: the forward fails at every example size; the message names ``input_size``.
    """
    import torch_pruning as tp

    modes = {m: m.training for m in model.modules()}
    errors = []
    try:
        model.eval()
        for x in _example(model, input_size):
            try:
                with torch.enable_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # its notes on unwrapped parameters: handled below
                    return tp.DependencyGraph().build_dependency(model, x, verbose=False)
            except Exception as err:  # the forward's own error, at this size
                errors.append(f"{tuple(x.shape)}: {type(err).__name__}: {err}")
    finally:
        for m, training in modes.items():
            m.training = training
    raise TypeError(f"cannot find the channel groups of {type(model).__name__}: its forward failed on "
                    f"{'; '.join(errors)}. Pass input_size= (C, H, W) or set model.input_size")


def tp_channel_groups(model: nn.Module, input_size: Sequence[int] | None = None) -> list[ChannelGroup]:
    """The prunable channel groups of any ``nn.Module``, from Torch-Pruning's dependency graph.

    Args:
        model: the network (not a LightningModule wrapper).
        input_size: (C, H, W) of one example; default ``model.input_size``, else (3, 32, 32) and, if the
            forward fails there, (3, 224, 224). Any size at which the forward runs gives the same groups.

    Returns:
        One group per coupled set of channels, in Torch-Pruning's order, named by its root layer
        (the first conv or linear layer of the set), attention heads as ``<block>.heads``.
    """
    dg = dependency_graph(model, input_size)
    names = {m: n for n, m in model.named_modules()}
    params = {p: n for n, p in model.named_parameters()}
    pdims = {u.parameters: u.pruning_dim for u in dg.unwrapped_parameters}
    attn = attention_blocks(model)
    qkvs = {m.qkv for m in attn.values()}
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        root = g[0].dep.target.module
        if root in qkvs:  # offered as heads below
            continue
        members: list[Member] = []
        reason = None
        for item in g.items:
            m, handler = item.dep.target.module, item.dep.handler
            kind = "out" if dg.is_out_channel_pruning_fn(handler) else "in"
            if isinstance(m, nn.Parameter):
                path, kind, dim = params.get(m), "param", pdims.get(m, -1)
                if path is None:
                    reason = "an unnamed parameter"
                    break
            elif isinstance(m, nn.Module) and m in names:
                path, dim = names[m], 0
                why = _cuttable(m)
                if why is not None:
                    reason = f"{path} is a {why}"
                    break
                if m in qkvs and kind == "out":
                    reason = f"{path} is an attention block's qkv (pruned by heads)"
                    break
                if kind == "out" and not dg.module2node[m].outputs:
                    reason = f"{path} produces the model's output"
                    break
                if kind == "in" and is_depthwise(m):
                    kind = "out"  # one set of channels: its filters are its inputs
            else:
                continue  # Torch-Pruning's own nodes for element-wise ops, reshapes, concatenations: no tensors
            members.append(Member(path, kind, tuple(int(i) for i in item.idxs), tuple(int(r) for r in item.root_idxs),
                                  dim))
        tied = _tie_slices(model, _merge(members)) if reason is None else None
        if isinstance(tied, str):
            reason, tied = tied, None
        if reason is not None:
            log.debug("group of %s is not prunable: %s", names.get(root, root), reason)
            continue
        groups.append(_group(model, tied))
    groups.extend(head_group(path, m) for path, m in attn.items())
    return groups


def _merge(members: list[Member]) -> tuple[Member, ...]:
    """One member per (path, kind): Torch-Pruning may reach a tensor twice (a depthwise conv's in and out)."""
    seen: dict[tuple[str, str], Member] = {}
    for m in members:
        key = (m.path, m.kind)
        if key in seen:
            old = seen[key]
            pairs = dict(zip(old.idx, old.roots))
            pairs.update((i, r) for i, r in zip(m.idx, m.roots) if i not in pairs)
            seen[key] = replace(old, idx=tuple(pairs), roots=tuple(pairs.values()))
        else:
            seen[key] = m
    return tuple(seen.values())


def _tie_slices(model: nn.Module, members: tuple[Member, ...]) -> tuple[Member, ...] | str:
    """Members whose channels respect the slices of the grouped convs, GroupNorms and attention heads among
    them (:func:`_slices`), or why they cannot.

    A layer with slices of width ``w`` can lose a position ``p`` (0 <= p < w) only from all of its slices
    at once. The channels of the group that sit at the same position of such a layer's slices are
    therefore tied into one channel of the returned members (Torch-Pruning ranks them the same way, by
    their mean importance), so that any keep vector removes whole positions. Refused when a tied channel
    does not reach every slice equally (a grouped conv only part of whose inputs come from this group).
    """
    sliced = [(m, _slices(model.get_submodule(m.path), m.kind)) for m in members if m.kind != "param"]
    sliced = [(m, s) for m, s in sliced if s is not None]
    if not sliced:
        return members
    n = max(max(m.roots) for m in members if m.roots) + 1
    parent = list(range(n))

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for m, (width, _) in sliced:
        first: dict[int, int] = {}
        for i, r in zip(m.idx, m.roots):
            a, b = find(first.setdefault(i % width, r)), find(r)
            parent[max(a, b)] = min(a, b)
    tie: dict[int, int] = {}
    for r in range(n):  # tied channels numbered in the order of their first original channel
        tie.setdefault(find(r), len(tie))
    tied = tuple(replace(m, roots=tuple(tie[find(r)] for r in m.roots)) for m in members)
    for m, (width, count) in sliced:
        hits: dict[int, list[int]] = {}
        for i, r in zip(m.idx, next(t for t in tied if t.path == m.path and t.kind == m.kind).roots):
            hits.setdefault(r, [0] * count)[i // width] += 1
        if any(len(set(h)) != 1 for h in hits.values()):
            return f"{m.path} has slices (groups or heads) that this group reaches unevenly"
    return tied


def _group(model: nn.Module, members: tuple[Member, ...]) -> ChannelGroup:
    mods = {m.path: model.get_submodule(m.path) for m in members if m.kind != "param"}
    outs = [m.path for m in members if m.kind == "out"]
    ins = [m.path for m in members if m.kind == "in"]
    scored = [p for p in outs if isinstance(mods[p], (nn.Conv2d, nn.Linear))]
    norms = [p for p in outs if isinstance(mods[p], SCALE_NORMS)]
    return ChannelGroup(name=members[0].path, producers=tuple(outs), consumers=tuple(ins),
                        conv=scored[0] if scored else None, bn=norms[0] if norms else None, members=members)


def member_size(group: ChannelGroup) -> int:
    """Number of channels of a member-described group."""
    return max(group.members[0].roots) + 1 if group.members[0].roots else 0


def mask_exact(model: nn.Module, group: ChannelGroup) -> bool:
    """Whether masking ``group`` computes exactly what pruning it does (no LayerNorm or GroupNorm normalises its
    channels together, no ``nn.MultiheadAttention`` scales by its head width)."""
    inexact = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)
    return not any(m.kind == "out" and isinstance(model.get_submodule(m.path), inexact) for m in group.members)


def removed_indices(groups: Mapping[str, ChannelGroup], keeps: Mapping[str, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """``{(path, kind, dim): sorted indices to remove}`` over all members of the groups named in ``keeps``."""
    out: dict[tuple, set[int]] = {}
    for name, keep in keeps.items():
        g = groups[name]
        gone = (~keep.to(torch.bool).cpu()).nonzero().flatten()
        if gone.numel() == 0:
            continue
        gone_set = set(gone.tolist())
        for m in g.members:
            rem = out.setdefault((m.path, m.kind, m.dim), set())
            rem.update(i for i, r in zip(m.idx, m.roots) if r in gone_set)
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in out.items() if v}


def renumber(groups: Sequence[ChannelGroup], keeps: Mapping[str, torch.Tensor],
             removed: Mapping[tuple, torch.Tensor]) -> list[ChannelGroup]:
    """The groups of the model after :func:`removed` indices went: members renumbered, no trace needed."""
    out = []
    for g in groups:
        keep = keeps.get(g.name)
        if keep is not None:
            keep = keep.to(torch.bool).cpu()
            new_root = torch.cumsum(keep.long(), 0) - 1  # old channel -> new channel (where kept)
        members = []
        for m in g.members:
            idx, roots = torch.tensor(m.idx, dtype=torch.long), torch.tensor(m.roots, dtype=torch.long)
            if keep is not None:
                alive = keep[roots]
                idx, roots = idx[alive], new_root[roots[alive]]
            rem = removed.get((m.path, m.kind, m.dim))
            if rem is not None and rem.numel():
                idx = idx - torch.searchsorted(rem, idx)
            members.append(replace(m, idx=tuple(idx.tolist()), roots=tuple(roots.tolist())))
        out.append(replace(g, members=tuple(members)))
    return out
