"""Boolean masks over parameters: the one mask mechanism of every method.

A mask set is ``{parameter name: bool tensor}``; each tensor has the parameter's shape or broadcasts
to it (a filter mask of a conv weight is ``(C_out, 1, 1, 1)``). Masks are applied to the weights,
their gradients and the optimizer's momentum, so a pruned weight cannot come back.

Structured masks (a group's channels) also zero the BatchNorm gamma/beta of removed channels, so that
the masked model computes exactly what the physically pruned model computes (the removed channels
output 0 after BN and ReLU).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup

Masks = dict[str, torch.Tensor]


def _rows(param: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A dim-0 mask for ``param`` (keep has one entry per output channel): shape (C, 1, ..., 1)."""
    return keep.to(device=param.device, dtype=torch.bool).reshape(-1, *([1] * (param.dim() - 1)))


def _columns(module: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """A dim-1 mask for a consumer's weight: (1, C, 1, 1) for a conv, (1, C * repeat) for a linear."""
    w = module.weight
    if isinstance(module, nn.Linear):
        repeat = w.shape[1] // keep.numel()
        return keep.repeat_interleave(repeat).reshape(1, -1).to(w.device)
    return keep.reshape(1, -1, *([1] * (w.dim() - 2))).to(w.device)


def group_masks(
    model: nn.Module,
    group: ChannelGroup,
    keep: torch.Tensor,
    *,
    zero_bn: bool = True,
    filters_only: bool = False,
    consumers: bool = False,
) -> Masks:
    """Masks that simulate removing the channels of ``group`` where ``keep`` is False.

    Args:
        zero_bn: also zero the BN gamma/beta of removed channels (exactness of masked vs. exported).
        filters_only: mask only the conv filters (Soft Filter Pruning as the paper codes it).
        consumers: also mask the consumers' input slices, so that the masked model has the narrow
            model's non-zero weights and FLOPs, and a retrained masked model stays equal to a narrow one
            (structured lottery tickets).
    """
    keep = keep.to(torch.bool).cpu()
    if group.members:
        return _member_masks(model, group, keep, zero_bn=zero_bn, filters_only=filters_only, consumers=consumers)
    masks: Masks = {}
    if group.selection is not None:
        # The stream keeps its width; what changes is which channels the consumers read. Zeroing the
        # consumers' input slices is exactly what removing them does.
        return {f"{path}.weight": _columns(model.get_submodule(path), keep) for path in group.consumers}
    if not filters_only and group.branch and not bool(keep.any()):
        # The whole residual branch goes: silence all of it (its output BN too), so that the masked
        # block equals the exported block, which is its bare shortcut.
        for path in group.branch:
            for pname, p in model.get_submodule(path).named_parameters(recurse=False):
                masks[f"{path}.{pname}"] = torch.zeros((1,) * p.dim(), dtype=torch.bool)
        return masks
    for path in (group.conv,) if filters_only else group.producers:
        if path is None:
            continue
        module = model.get_submodule(path)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not zero_bn:
            continue
        for pname, p in module.named_parameters(recurse=False):
            masks[f"{path}.{pname}"] = _rows(p, keep)
    if consumers:
        masks.update({f"{path}.weight": _columns(model.get_submodule(path), keep) for path in group.consumers})
    return masks


def _member_masks(model: nn.Module, group: ChannelGroup, keep: torch.Tensor, *, zero_bn: bool, filters_only: bool,
                  consumers: bool) -> Masks:
    """Masks of a Torch-Pruning group: every member's removed indices, on the dim it is pruned along.

    Producers (``out``) lose rows of every tensor they own (weight, bias: a depthwise conv's filters, a
    LayerNorm's scales), bare parameters their entries along their dim, consumers (``in``) their weight's
    columns. ``filters_only`` keeps only the scored layer's rows; ``zero_bn=False`` leaves norms unmasked.
    """
    from lit_prune.core.graph import SCALE_NORMS, removed_indices

    masks: Masks = {}
    for (path, kind, dim), gone in removed_indices({group.name: group}, {group.name: keep}).items():
        if kind == "param":
            p = model.get_parameter(path)
            masks[path] = _along(p, dim % p.dim(), gone)
            continue
        module = model.get_submodule(path)
        norm = isinstance(module, SCALE_NORMS)
        if (filters_only and path != group.conv) or (norm and not zero_bn) or (kind == "in" and not consumers):
            continue
        if isinstance(module, nn.MultiheadAttention):
            masks.update(_attention_masks(path, module, gone))
            continue
        if kind == "in":  # a grouped conv's weight holds one slice of inputs: the same positions of each go
            width = module.weight.shape[1]
            masks[f"{path}.weight"] = _along(module.weight, 1, (gone % width).unique())
            continue
        for pname, p in module.named_parameters(recurse=False):
            masks[f"{path}.{pname}"] = _along(p, 0, gone)
    return masks


def _attention_masks(path: str, attn: nn.MultiheadAttention, gone: torch.Tensor) -> Masks:
    """An ``nn.MultiheadAttention`` losing stream channels ``gone``: the q, k and v rows and the input
    columns of its packed projection, the rows and columns of its output projection."""
    e = attn.embed_dim
    rows = torch.cat([gone + s * e for s in range(3)])
    masks = {f"{path}.in_proj_weight": _along(attn.in_proj_weight, 0, rows) & _along(attn.in_proj_weight, 1, gone),
             f"{path}.out_proj.weight": _along(attn.out_proj.weight, 0, gone) & _along(attn.out_proj.weight, 1, gone)}
    if attn.in_proj_bias is not None:
        masks[f"{path}.in_proj_bias"] = _along(attn.in_proj_bias, 0, rows)
    if attn.out_proj.bias is not None:
        masks[f"{path}.out_proj.bias"] = _along(attn.out_proj.bias, 0, gone)
    return masks


def _along(p: torch.Tensor, dim: int, gone: torch.Tensor) -> torch.Tensor:
    """A bool mask broadcasting to ``p`` that zeroes indices ``gone`` of dimension ``dim``."""
    keep = torch.ones(p.shape[dim], dtype=torch.bool)
    keep[gone] = False
    shape = [1] * p.dim()
    shape[dim] = -1
    return keep.reshape(shape)


def merge(*mask_sets: Mapping[str, torch.Tensor]) -> Masks:
    """Combine mask sets; a parameter masked twice keeps only what both keep."""
    out: Masks = {}
    for ms in mask_sets:
        for name, m in ms.items():
            out[name] = (out[name] & m) if name in out else m.clone()
    return out


# Bool masks stay the stored form (checkpoints, artifacts); the per-step hot path multiplies by a copy in
# the parameter's dtype and device, made once per mask: multiplying by a bool tensor converts it every
# time (about 4x slower per element on CPU, benchmarks/callback_overhead.py).
# Keyed by id(mask) (tensors compare element-wise, so they cannot be dict keys); an entry goes with its mask.
# Masks are therefore treated as immutable: every method builds new mask tensors instead of editing them.
_CAST: dict[int, dict[tuple[torch.device, torch.dtype], torch.Tensor]] = {}


def _cast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    copies = _CAST.get(id(mask))
    if copies is None:
        copies = _CAST[id(mask)] = {}
        weakref.finalize(mask, _CAST.pop, id(mask), None)
    key = (like.device, like.dtype)
    if key not in copies:
        copies[key] = mask.to(device=like.device, dtype=like.dtype)
    return copies[key]


def _params(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r} matches no parameter of {type(model).__name__}")
        p = params[name]
        yield p, _cast(m, p)


@torch.no_grad()
def apply_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Zero masked weights, and their momentum in ``optimizer`` so they stay zero after the next step."""
    for p, m in _params(model, masks):
        p.mul_(m)
        if optimizer is not None:
            state = optimizer.state.get(p, {})
            buf = state.get("momentum_buffer")
            if buf is not None:
                buf.mul_(m)


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    for p, m in _params(model, masks):
        if p.grad is not None:
            p.grad.mul_(m)


def sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-parameter entries that are masked out."""
    total = pruned = 0
    for p, m in _params(model, masks):
        full = m.expand_as(p)
        total += full.numel()
        pruned += int((full == 0).sum())
    return pruned / total if total else 0.0
