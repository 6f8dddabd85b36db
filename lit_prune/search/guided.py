"""Guided pruning and guided sparsification (Section 5, Figure 5 as we read it; the paper gives no code for it).

Guided pruning: from a method's pruned architectures, the mean kept ratio of the channel groups of each stage
(layers of the same feature-map size, :mod:`lit_prune.search.stages`), averaged over the artifacts given (the
seeds' or the variants'); a new model (the same zoo model or another, e.g. VGG-19 for 100 classes from ratios
found on VGG-16 for CIFAR-10: *transferred* guided pruning) keeps ``int(C * ratio)`` channels (at least one) of
every group of stage ``i``, trained from scratch. Stages are matched by position, largest map first.

Guided sparsification: from masked (magnitude-pruned) artifacts, the mean sparsity of each stage at each kernel
position (a 3x3 conv has nine), applied to a new model as masks: at every position of every conv of stage
``i``, ``round(N * sparsity)`` of its ``N`` weights masked at random (a fixed seed).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import nn

from lit_prune.artifact import Artifact, build_model, make_artifact
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import Masks, apply_masks
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.plan import WidthPlan
from lit_prune.methods.state import Counts
from lit_prune.models import architecture, create_model
from lit_prune.search.stages import group_stages, output_sizes, stage_index
from lit_prune.search.uniform import shapes_device

StageRatios = list[float]  # kept ratio per stage, stage 0 the largest feature map
#: ``{stage: {kernel "3x3": [[sparsity per position]]}}``
KernelPattern = dict[int, dict[str, list[list[float]]]]


def _input_size(model: nn.Module, art: Artifact | None = None) -> tuple[int, ...]:
    if art is not None and art.input_size:
        return tuple(art.input_size)
    return tuple(getattr(model, "input_size", (3, 32, 32)))


def stage_ratios(pruned: nn.Module, dense: nn.Module, input_size: Sequence[int]) -> StageRatios:
    """The mean over each stage's groups of ``channels in pruned / channels in dense`` (a group the pruned model
    lacks: 0). Stages come from ``dense``."""
    groups = channel_groups(dense)
    stages = group_stages(dense, groups, input_size)
    kept = {g.name: group_size(pruned, g) for g in channel_groups(pruned)}
    per_stage: dict[int, list[float]] = {}
    for g in groups:
        per_stage.setdefault(stages[g.name], []).append(kept.get(g.name, 0) / group_size(dense, g))
    return [statistics.fmean(per_stage[s]) for s in sorted(per_stage)]


def mean_ratios(ratio_sets: Sequence[StageRatios]) -> StageRatios:
    """The stage-wise mean of several artifacts' ratios (their seeds, or several variants)."""
    if not ratio_sets or len({len(r) for r in ratio_sets}) != 1:
        raise ValueError(f"cannot average stage ratios of different stage counts: {[len(r) for r in ratio_sets]}")
    return [statistics.fmean(col) for col in zip(*ratio_sets, strict=True)]


def guided_architecture(target: nn.Module, ratios: StageRatios, input_size: Sequence[int] | None = None,
                        method: str = "guided", settings: dict | None = None) -> Artifact:
    """A fresh ``target`` architecture whose stage-``i`` groups keep ``int(C * ratios[i])`` channels (>= 1).

    Raises:
        ValueError: ``target`` has another number of stages than ``ratios``.
    """
    size = tuple(input_size or _input_size(target))
    shape = architecture(target)
    with torch.device(shapes_device(lambda: create_model(shape["name"], **shape["kwargs"]))):
        skeleton = create_model(shape["name"], **shape["kwargs"])
    groups = channel_groups(skeleton)
    stages = group_stages(skeleton, groups, size)
    if len(set(stages.values())) != len(ratios):
        raise ValueError(f"{shape['name']} has {len(set(stages.values()))} stages at input {size}, the ratios "
                         f"{len(ratios)} ({[round(r, 3) for r in ratios]}); guide a model with as many feature-map "
                         "sizes")
    plan = WidthPlan(prune_ratio={g.name: min(1.0 - ratios[stages[g.name]], 1.0 - 1e-12) for g in groups}, floor=1)
    counts = plan.counts(skeleton, groups)
    prune_groups(skeleton, {g.name: torch.arange(group_size(skeleton, g)) < counts[g.name] for g in groups})
    pruned = architecture(skeleton)
    model = create_model(pruned["name"], **pruned["kwargs"])  # fresh initialisation
    dense = Counts.of(create_model(shape["name"], **shape["kwargs"]), input_size=size)
    return make_artifact(model, method=method, dense=dense, settings={
        "stage_ratios": list(ratios), **(settings or {}), "weights": "fresh initialisation, none inherited"})


# ---- guided sparsification ------------------------------------------------------------------------------
def _conv_stages(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> dict[str, int]:
    """``{weight name: stage}`` of the convs whose weights are ``names``."""
    paths = [n.removesuffix(".weight") for n in names]
    convs = [p for p in paths if isinstance(model.get_submodule(p), nn.Conv2d)]
    index = stage_index(output_sizes(model, [p for p in model_convs(model)], input_size))
    return {f"{p}.weight": index[p] for p in convs}


def model_convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def kernel_pattern(model: nn.Module, masks: Masks, input_size: Sequence[int]) -> KernelPattern:
    """Mean sparsity per stage and kernel position of the masked convs of ``model`` (mean over the stage's
    convs of that kernel size)."""
    stages = _conv_stages(model, list(masks), input_size)
    acc: dict[int, dict[str, list[torch.Tensor]]] = {}
    for name, stage in stages.items():
        m = masks[name].bool()
        kernel = f"{m.shape[2]}x{m.shape[3]}"
        acc.setdefault(stage, {}).setdefault(kernel, []).append(1 - m.float().mean(dim=(0, 1)))
    return {s: {k: torch.stack(v).mean(0).tolist() for k, v in kernels.items()} for s, kernels in acc.items()}


def mean_patterns(patterns: Sequence[KernelPattern]) -> KernelPattern:
    out: KernelPattern = {}
    for s in patterns[0]:
        out[s] = {k: torch.tensor([p[s][k] for p in patterns if k in p.get(s, {})]).mean(0).tolist()
                  for k in patterns[0][s]}
    return out


def pattern_masks(model: nn.Module, pattern: KernelPattern, input_size: Sequence[int], seed: int = 0) -> Masks:
    """Masks for every conv of ``model`` whose stage and kernel size ``pattern`` has: at each kernel position,
    ``round(N * sparsity)`` of its ``N`` weights masked at random."""
    gen = torch.Generator().manual_seed(seed)
    stages = _conv_stages(model, [f"{p}.weight" for p in model_convs(model)], input_size)
    params = dict(model.named_parameters())
    masks: Masks = {}
    for name, stage in stages.items():
        w = params[name]
        kernel = f"{w.shape[2]}x{w.shape[3]}"
        sparsity = pattern.get(stage, {}).get(kernel)
        if sparsity is None:
            continue
        mask = torch.ones(w.shape, dtype=torch.bool)
        n = w.shape[0] * w.shape[1]
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                k = round(n * float(sparsity[i][j]))
                flat = torch.ones(n, dtype=torch.bool)
                flat[torch.randperm(n, generator=gen)[:k]] = False
                mask[:, :, i, j] = flat.view(w.shape[0], w.shape[1])
        masks[name] = mask
    return masks


def guided_sparsity(target: nn.Module, pattern: KernelPattern, input_size: Sequence[int] | None = None,
                    seed: int = 0, settings: dict | None = None) -> Artifact:
    """A fresh ``target`` with the masks of :func:`pattern_masks` (trained from scratch under them)."""
    size = tuple(input_size or _input_size(target))
    shape = architecture(target)
    model = create_model(shape["name"], **shape["kwargs"])
    dense = Counts.of(model, input_size=size)
    masks = pattern_masks(model, pattern, size, seed)
    if not masks:
        raise ValueError(f"no conv of {shape['name']} has a stage and kernel size of the pattern {list(pattern)}")
    apply_masks(model, masks)
    return make_artifact(model, method="guided_sparsity", dense=dense, masks=masks, settings={
        "pattern": {str(k): v for k, v in pattern.items()}, "seed": seed, **(settings or {})})


# ---- from artifacts -----------------------------------------------------------------------------------
def guided_from(arts: Sequence[tuple[Artifact, nn.Module]], target: nn.Module, seed: int = 0,
                sources: Sequence[str] = ()) -> Artifact:
    """Guided pruning (or, for masked artifacts, guided sparsification) of ``target`` from ``(artifact, the dense
    model it was pruned from)`` pairs."""
    if not arts:
        raise ValueError("guided pruning needs at least one pruned artifact")
    masked = {bool(a.masks) for a, _ in arts}
    if len(masked) != 1:
        raise ValueError("cannot guide from masked and physically pruned artifacts together")
    size = _input_size(target, arts[0][0])
    settings = {"sources": list(sources)}
    if masked.pop():
        pattern = mean_patterns([kernel_pattern(dense, a.masks, _input_size(dense, a)) for a, dense in arts])
        return guided_sparsity(target, pattern, size, seed, settings)
    ratios = mean_ratios([stage_ratios(_skeleton(a), dense, _input_size(dense, a)) for a, dense in arts])
    return guided_architecture(target, ratios, size, settings=settings)


def _skeleton(art: Artifact) -> nn.Module:
    with torch.device(shapes_device(lambda: build_model(art, weights=False))):
        return build_model(art, weights=False)
