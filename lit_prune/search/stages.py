"""Stages of a network: its layers grouped by the size of the feature map they produce (the paper's Section 5
averages pruned widths over "layer stages", layers of the same feature-map size)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_prune.core.groups import ChannelGroup


@torch.no_grad()
def output_sizes(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """``{module path: spatial size of its output}`` for one input of ``input_size`` (``()`` for a linear layer).

    The forward pass runs on the meta device when the model is there (shapes are all it needs)."""
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for path in dict.fromkeys(paths):
        def hook(module, inputs, output, path=path):
            sizes.setdefault(path, tuple(output.shape[2:]))
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    missing = [p for p in paths if p not in sizes]
    if missing:
        raise ValueError(f"{', '.join(missing)} did not run in a forward pass of {type(model).__name__}")
    return sizes


def stage_index(sizes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Stage 0 is the largest feature map, then each smaller one; linear layers (no map) come last."""
    order = sorted(set(sizes.values()), key=lambda s: -int(torch.tensor(s or (0,)).prod()))
    return {path: order.index(size) for path, size in sizes.items()}


def group_stages(model: nn.Module, groups: Sequence[ChannelGroup], input_size: Sequence[int]) -> dict[str, int]:
    """``{group name: stage}``: the stage of the map its channels belong to (its first producer's output)."""
    producers = {g.name: g.producers[0] if g.producers else g.selection for g in groups}
    sizes = output_sizes(model, [p for p in producers.values() if p], input_size)
    index = stage_index(sizes)
    return {name: index[path] for name, path in producers.items() if path}
