"""The random-selection control: a method's result with its choice of weights replaced by chance.

Structured: every group keeps as many channels as in the method's artifact, chosen uniformly at random (a fixed
seed) from the large model; the kept channels' weights are the large model's, so the control is fine-tuned as
the method's artifact is. Masked: every masked tensor keeps as many weights as the method's mask, at random
positions (element-wise, also for a structured mask). If fine-tuning both ends level, the method's choice of
weights did not matter, only its widths: the paper's question (Section 5).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lit_prune.artifact import Artifact, build_model, make_artifact
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import Masks, apply_masks
from lit_prune.core.surgery import prune_groups
from lit_prune.models import architecture
from lit_prune.search.uniform import shapes_device


def kept_counts(art: Artifact) -> dict[str, int]:
    """``{group name: channels}`` of an artifact's architecture (a group its model lacks: none kept)."""
    with torch.device(shapes_device(lambda: build_model(art, weights=False))):
        model = build_model(art, weights=False)
    return {g.name: group_size(model, g) for g in channel_groups(model)}


def random_keeps(large: nn.Module, counts: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Per group of ``large``, ``counts[group]`` channels kept at random (every channel where it is not pruned)."""
    gen = torch.Generator().manual_seed(seed)
    keeps = {}
    for g in channel_groups(large):
        size = group_size(large, g)
        k = counts.get(g.name, 0)
        if k >= size:
            continue
        keep = torch.zeros(size, dtype=torch.bool)
        keep[torch.randperm(size, generator=gen)[:k]] = True
        keeps[g.name] = keep
    return keeps


def random_masks(masks: Masks, seed: int) -> Masks:
    """Masks of the same shapes and kept counts as ``masks``, at random positions."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(masks):
        m = masks[name].bool()
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        out[name] = keep.view(m.shape)
    return out


def random_control(large: nn.Module, art: Artifact, seed: int) -> Artifact:
    """The random-selection control of ``art`` (see the module docstring), from the model ``art`` was pruned from.

    Raises:
        ValueError: ``large`` is not the model ``art`` came from (its widths cannot be reproduced).
    """
    model = copy.deepcopy(large).cpu()
    settings = {"of": art.provenance.method, "seed": seed}
    if art.masks:
        masks = random_masks(art.masks, seed)
        apply_masks(model, masks)
        return make_artifact(model, method=f"random:{art.provenance.method}", dense=art.flops.dense, masks=masks,
                             settings={**settings, "selection": "random weights, the method's per-tensor counts"})
    want = kept_counts(art)
    prune_groups(model, random_keeps(model, want, seed))
    got = {g.name: group_size(model, g) for g in channel_groups(model)}  # widths (which channels may differ)
    if got != want:
        diff = {k: (got.get(k), want.get(k)) for k in {*got, *want} if got.get(k) != want.get(k)}
        raise ValueError(f"the random control's widths differ from the method's at {diff} (control, method): is "
                         f"the large model ({architecture(model)['name']}) the one the artifact was pruned from?")
    return make_artifact(model, method=f"random:{art.provenance.method}", dense=art.flops.dense,
                         settings={**settings, "selection": "random channels, the method's widths"})
