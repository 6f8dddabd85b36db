"""Section 5's controls and searches (``lit_prune.search``): the uniform baseline matches the method's count to
within one channel per group, the random control keeps the method's widths but other channels, guided ratios are
the stage means, a transferred ratio set builds another model, guided sparsification reproduces its pattern."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from lit_prune.artifact import build_model, make_artifact
from lit_prune.core.masks import apply_masks
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.filter_norm import FilterNormPruning
from lit_prune.methods.magnitude import MagnitudeMasks
from lit_prune.methods.plan import WidthPlan
from lit_prune.methods.state import Counts
from lit_prune.models import architecture, create_model
from lit_prune.search.guided import guided_architecture, guided_from, kernel_pattern, pattern_masks, stage_ratios
from lit_prune.search.random_control import kept_counts, random_control
from lit_prune.search.uniform import prunable_groups, uniform_baseline

CFG = [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32]  # a narrow VGG-11: five stages at 32x32
SIZE = (3, 32, 32)


def _large(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("cifar_vgg11", cfg=CFG, num_classes=10).eval()


class _Method:  # what prunable_groups reads of a callback: its pruner and the pruner's width plan
    def __init__(self, pruner):
        self.pruner = pruner


def _l1(large, ratios, skip=()):
    pruner = FilterNormPruning(WidthPlan(prune_ratio=ratios, skip=list(skip)))
    keeps = pruner.keeps(large)
    pruned = copy.deepcopy(large)
    prune_groups(pruned, keeps)
    return make_artifact(pruned, method="l1_norm", dense=Counts.of(large)), keeps, _Method(pruner)


def _one_channel_cost(model, match: str) -> int:
    """What one more channel in every group costs: the bound the bisection's rounding may miss by."""
    shape = architecture(model)
    cfg = [c if c == "M" else c + 1 for c in shape["kwargs"]["cfg"]]
    plus = create_model(shape["name"], **{**shape["kwargs"], "cfg": cfg})
    a, b = Counts.of(model, input_size=SIZE), Counts.of(plus, input_size=SIZE)
    return (b.params - a.params) if match == "params" else (b.macs - a.macs)


@pytest.mark.parametrize("match", ["params", "flops"])
def test_uniform_widths_match_the_method_within_one_channel_per_group(match: str) -> None:
    large = _large()
    art, _, method = _l1(large, {"features.0": 0.5, "features.4": 0.5, "*": 0.25})
    found = uniform_baseline(large, art, match, method)
    target = art.flops.pruned.params if match == "params" else art.flops.pruned.macs
    model = build_model(found.artifact, weights=False)
    assert found.target == target
    assert abs(found.reached - target) <= _one_channel_cost(model, match)
    cfg = [c for c in found.artifact.architecture.kwargs["cfg"] if c != "M"]
    widths = [c for c in CFG if c != "M"]
    ratios = {k / w for k, w in zip(cfg, widths, strict=True)}
    assert max(ratios) - min(ratios) < 1 / 8 + 1e-9  # one multiplier, up to int() rounding of 8-wide layers
    assert found.artifact.flops.dense == art.flops.dense  # Scratch-B's r: the uniform model's own FLOPs ratio
    assert found.artifact.provenance.method == "uniform"


def test_uniform_honours_the_method_s_skip_list() -> None:
    large = _large()
    art, _, method = _l1(large, 0.5, skip=["features.0"])
    assert "features.0" not in [g.name for g in prunable_groups(large, method)]
    found = uniform_baseline(large, art, "params", method)
    assert found.artifact.architecture.kwargs["cfg"][0] == CFG[0]  # left whole, as the method left it


def test_uniform_sparsity_of_a_masked_model() -> None:
    large = _large()
    masks = MagnitudeMasks(amount=0.6).compute_masks(large, 0.6)  # one global threshold: uneven per layer
    masked = copy.deepcopy(large)
    apply_masks(masked, masks)
    art = make_artifact(masked, method="magnitude", dense=Counts.of(large), masks=masks)
    found = uniform_baseline(large, art, "params")
    per_layer = {k: 1 - m.float().mean().item() for k, m in found.artifact.masks.items()}
    assert max(per_layer.values()) - min(per_layer.values()) < 0.01  # one sparsity everywhere
    n_layers = len(masks)
    assert abs(found.reached - art.flops.pruned.params) <= n_layers  # int() rounding: one weight per tensor


def test_random_control_keeps_the_widths_and_other_channels() -> None:
    large = _large()
    art, keeps, _ = _l1(large, 0.5)
    control = random_control(large, art, seed=0)
    assert control.architecture.kwargs == art.architecture.kwargs  # exactly the method's widths
    assert kept_counts(control) == kept_counts(art)
    assert control.flops.pruned == art.flops.pruned
    # its channels are not the method's: the kept filters' weights differ from the L1 choice somewhere
    chosen = build_model(control)
    w_l1 = large.features[0].weight[keeps["features.0"]]
    assert not torch.equal(chosen.features[0].weight, w_l1)
    # ... they are large-model filters all the same (weights inherited, to be fine-tuned)
    rows = {tuple(r.flatten().tolist()) for r in large.features[0].weight}
    assert all(tuple(r.flatten().tolist()) in rows for r in chosen.features[0].weight)
    again = random_control(large, art, seed=0)
    assert torch.equal(again.state_dict["features.0.weight"], control.state_dict["features.0.weight"])  # fixed seed


def test_guided_ratios_are_the_stage_means_of_a_hand_built_architecture() -> None:
    dense = _large()
    # stages at 32, 16, 8, 4, 2: widths 8 | 16 | 16 16 | 32 32 | 32 32
    pruned = create_model("cifar_vgg11", cfg=[4, "M", 12, "M", 8, 12, "M", 8, 24, "M", 32, 16], num_classes=10)
    ratios = stage_ratios(pruned, dense, SIZE)
    expected = [4 / 8, 12 / 16, statistics.fmean([8 / 16, 12 / 16]), statistics.fmean([8 / 32, 24 / 32]),
                statistics.fmean([32 / 32, 16 / 32])]
    assert ratios == pytest.approx(expected)
    art = guided_architecture(dense, ratios, SIZE)
    assert art.architecture.kwargs["cfg"] == [4, "M", 12, "M", 10, 10, "M", 16, 16, "M", 24, 24]


def test_transferred_ratios_build_a_valid_vgg19_for_100_classes() -> None:
    ratios = [0.5, 0.6, 0.4, 0.2, 0.1]  # e.g. found on VGG-16 for CIFAR-10
    target = create_model("cifar_vgg19", num_classes=100)
    art = guided_architecture(target, ratios, SIZE)
    model = build_model(art)
    assert model(torch.zeros(2, *SIZE)).shape == (2, 100)
    cfg = [c for c in art.architecture.kwargs["cfg"] if c != "M"]
    assert cfg[:2] == [32, 32] and cfg[-4:] == [51] * 4  # int(64 * 0.5), int(512 * 0.1)
    assert art.flops.ratio > 1
    with pytest.raises(ValueError, match="has 5 stages"):
        guided_architecture(target, ratios[:3], SIZE)


def test_guided_from_physically_pruned_artifacts_averages_them() -> None:
    large = _large()
    a, _, _ = _l1(large, 0.5)
    b, _, _ = _l1(large, 0.25)
    art = guided_from([(a, large), (b, large)], large)
    widths = [c for c in CFG if c != "M"]
    cfg = [c for c in art.architecture.kwargs["cfg"] if c != "M"]
    assert cfg == [int(w * (0.5 + 0.75) / 2) for w in widths]


def test_guided_sparsification_reproduces_the_per_position_sparsity() -> None:
    large = _large()
    # a pattern that differs by position: the centre of every 3x3 kernel kept more often
    masks = {}
    gen = torch.Generator().manual_seed(1)
    for name, p in large.named_parameters():
        if p.dim() == 4:
            keep = torch.rand(p.shape, generator=gen) > 0.7
            keep[:, :, 1, 1] = torch.rand(p.shape[:2], generator=gen) > 0.2
            masks[name] = keep
    pattern = kernel_pattern(large, masks, SIZE)
    assert pattern[0]["3x3"][1][1] < pattern[0]["3x3"][0][0]
    target = create_model("cifar_vgg19", cfg=[16, 16, "M", 32, 32, "M", 32, 32, 32, 32, "M", 64, 64, 64, 64, "M",
                                              64, 64, 64, 64], num_classes=100)
    again = kernel_pattern(target, pattern_masks(target, pattern, SIZE, seed=0), SIZE)
    for stage, kernels in pattern.items():
        assert torch.allclose(torch.tensor(again[stage]["3x3"]), torch.tensor(kernels["3x3"]), atol=0.01)
