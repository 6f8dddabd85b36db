"""The one FLOPs counter and its two conventions (docs/paper-settings.md §1.3-1.4, design.md "FLOPs").

The ``"reference"`` convention is checked against counts written here directly from the formulas of
docs/paper-settings.md §1.4 (conv ``(2 k^2 C_in + [1 if bias]) C_out H W``, sparse conv ``(2 nnz + [C_out]) H W``,
linear ``2 #w + #b``, BN2d ``2 numel(in)``, ReLU ``numel(in)`` per call, pool modules ``k^2 numel(out)``; BN1d,
selections, additions, concatenations and pools instantiated in ``forward`` not counted), layer by layer
from the width configs, on a dense, two channel-selected and a masked model.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lit_prune.core.budget import scratch_b_budget
from lit_prune.core.flops import CONVENTIONS, count_flops, flops_ratio
from lit_prune.models import create_model

M = "M"
VGG19 = [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512]
# Network Slimming's VGG-19 pruned at 70% (issue 14): reference r = 11.019, 1763 epochs, milestones 881/1322
VGG19_SLIM70 = [19, 15, M, 41, 41, M, 74, 67, 93, 73, M, 147, 162, 157, 155, M, 152, 148, 157, 150]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- independent counts from the formulas of docs/paper-settings.md §1.4
# ----------------------------------------------
def conv(c_in: int, c_out: int, k: int, hw: int, bias: bool = False) -> int:
    return (2 * k * k * c_in + int(bias)) * c_out * hw * hw


def bn(c: int, hw: int) -> int:
    return 2 * c * hw * hw


def relu(c: int, hw: int) -> int:
    return c * hw * hw


def linear(c_in: int, c_out: int) -> int:
    return 2 * c_in * c_out + c_out


def vgg_reference(cfg: list, num_classes: int, nnz: list[int] | None = None, bias: bool = False) -> int:
    """CIFAR VGG with a single Linear head (slimming, bearpaw): conv-BN-ReLU per width, 2x2 max-pools
    (modules, counted), the final 2x2 average pool instantiated in forward (not counted). With ``nnz``, the
    sparse conv variant of the weight-level counter: ``(2 nnz + [C_out]) H W``."""
    total, c, hw, i = 0, 3, 32, 0
    for v in cfg:
        if v == M:
            hw //= 2
            total += 4 * c * hw * hw  # k^2 * numel(output)
            continue
        if nnz is None:
            total += conv(c, v, 3, hw, bias)
        else:
            total += (2 * nnz[i] + (v if bias else 0)) * hw * hw
        total += bn(v, hw) + relu(v, hw)
        c, i = v, i + 1
    return total + linear(c, num_classes)


def preresnet_reference(n: int, cfg: list[int], num_classes: int) -> int:
    """Slimming's PreResNet (docs/paper-settings.md §2.4): per block BN1 (full stream width) -> select -> ReLU
    (selected)
    -> conv1 -> BN2 -> ReLU -> conv2 (stride) -> BN3 -> ReLU -> conv3; a 1x1 downsample conv in the first
    block of a stage; then BN(256) -> select -> ReLU -> AvgPool2d(8) (a module: 64 * numel(out)) -> FC."""
    total = conv(3, 16, 3, 32)
    stream, hw, b = 16, 32, 0
    for s, planes in enumerate((16, 32, 64)):
        for i in range(n):
            reads, m1, m2 = cfg[3 * b : 3 * b + 3]
            out_hw = hw // 2 if s > 0 and i == 0 else hw
            total += bn(stream, hw) + relu(reads, hw) + conv(reads, m1, 1, hw)
            total += bn(m1, hw) + relu(m1, hw) + conv(m1, m2, 3, out_hw)
            total += bn(m2, out_hw) + relu(m2, out_hw) + conv(m2, 4 * planes, 1, out_hw)
            if i == 0:
                total += conv(stream, 4 * planes, 1, out_hw)
            stream, hw, b = 4 * planes, out_hw, b + 1
    final = cfg[-1]
    return total + bn(stream, 8) + relu(final, 8) + 64 * final + linear(final, num_classes)


def densenet_reference(n: int, growth: int, cfg: list[int], num_classes: int) -> int:
    """Slimming's DenseNet (docs/paper-settings.md §2.5): dense layer BN(stream) -> select -> ReLU -> conv3x3(reads ->
    growth), concatenated (not counted); transition BN -> select -> ReLU -> conv1x1(reads -> stream), then a
    functional 2x2 average pool (not counted); final BN -> select -> ReLU -> AvgPool2d(8) -> FC."""
    stream, hw, k = 2 * growth, 32, 0
    total = conv(3, stream, 3, hw)
    for block in range(3):
        for _ in range(n):
            reads = cfg[k]
            total += bn(stream, hw) + relu(reads, hw) + conv(reads, growth, 3, hw)
            stream, k = stream + growth, k + 1
        if block < 2:
            reads = cfg[k]
            total += bn(stream, hw) + relu(reads, hw) + conv(reads, stream, 1, hw)
            hw, k = hw // 2, k + 1
    final = cfg[-1]
    return total + bn(stream, 8) + relu(final, 8) + 64 * final + linear(final, num_classes)


def random_select(widths: list[int], rng: random.Random) -> list[list[int]]:
    return [sorted(rng.sample(range(w), rng.randint(1, w))) for w in widths]


# ---- the counter against them -------------------------------------------------------------------------
def test_dense_vgg19_and_its_70_percent_slim_match_the_formulas_and_the_papers_epochs() -> None:
    dense = count_flops(create_model("slim_vgg19"), convention="reference")
    pruned = count_flops(create_model("slim_vgg19", cfg=VGG19_SLIM70), convention="reference")
    assert dense.flops == vgg_reference(VGG19, 10)
    assert pruned.flops == vgg_reference(VGG19_SLIM70, 10)
    r = dense.flops / pruned.flops
    assert round(r, 3) == 11.019
    budget = scratch_b_budget(160, r, rule="fractions")
    assert (budget.epochs, budget.milestones) == (1763, [881, 1322])
    # the MACs convention (tables) gives a wider ratio: 11.050 -> 1768 epochs, the discrepancy
    macs_r = dense.macs / pruned.macs
    assert round(macs_r, 3) == 11.050 and scratch_b_budget(160, macs_r).epochs == 1768
    # one traversal: the reference report also carries the MACs, and the MACs report is unchanged
    assert dense.macs == count_flops(create_model("slim_vgg19")).macs == count_flops(create_model("slim_vgg19")).flops


def test_channel_selected_preresnet_matches_the_formulas() -> None:
    rng = random.Random(0)
    n = 2  # PreResNet-20: 6 blocks, every selection point different
    stream_in = [16, 64, 64, 128, 128, 256, 256]
    select = random_select(stream_in, rng)
    cfg = []
    for b in range(3 * n):
        planes = (16, 32, 64)[b // n]
        cfg += [len(select[b]), rng.randint(1, planes), rng.randint(1, planes)]
    cfg.append(len(select[-1]))
    model = create_model("slim_preresnet", depth=9 * n + 2, cfg=cfg, select=select, num_classes=100)
    assert count_flops(model, convention="reference").flops == preresnet_reference(n, cfg, 100)
    dense = create_model("slim_preresnet", depth=9 * n + 2, num_classes=100)
    full = [16, 16, 16, 64, 16, 16, 64, 32, 32, 128, 32, 32, 128, 64, 64, 256, 64, 64, 256]
    assert count_flops(dense, convention="reference").flops == preresnet_reference(n, full, 100)


def test_channel_selected_densenet_matches_the_formulas() -> None:
    rng = random.Random(1)
    n, growth = 2, 12  # DenseNet-10
    streams = [24, 36, 48, 48, 60, 72, 72, 84, 96]  # dense layers and transitions in order, then the final
    select = random_select(streams, rng)
    cfg = [len(s) for s in select]
    model = create_model("slim_densenet", depth=3 * n + 4, cfg=cfg, select=select)
    assert count_flops(model, convention="reference").flops == densenet_reference(n, growth, cfg, 10)
    assert count_flops(create_model("slim_densenet", depth=3 * n + 4), convention="reference").flops == \
        densenet_reference(n, growth, streams, 10)


def test_masked_model_counts_nonzero_conv_weights_and_a_dense_fc() -> None:
    """bearpaw VGG-16 (conv bias True): the weight-level counter's sparse conv, its FC stays dense."""
    torch.manual_seed(0)
    model = create_model("bearpaw_vgg16_bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for m in [*convs, model.classifier[0]]:
            m.weight.mul_((torch.rand_like(m.weight) > 0.8).float())  # ~80% zeros, FC too
    nnz = [int(torch.count_nonzero(m.weight)) for m in convs]
    cfg = [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512]
    report = count_flops(model, nonzero=True, convention="reference")
    assert report.flops == vgg_reference(cfg, 10, nnz=nnz, bias=True)
    dense = count_flops(model, convention="reference")  # nonzero=False: the dense formula
    assert dense.flops == vgg_reference(cfg, 10, bias=True)
    # the MACs convention counts the FC's non-zeros too, and neither bias nor BN/ReLU/pool
    sizes, hw = [], 32
    for v in cfg:
        if v == M:
            hw //= 2
        else:
            sizes.append(hw)
    expected = sum(nz * hw * hw for nz, hw in zip(nnz, sizes, strict=True))
    assert count_flops(model, nonzero=True).flops == expected + int(torch.count_nonzero(model.classifier[0].weight))


def test_macs_convention_is_unchanged_and_conventions_are_checked() -> None:
    model = create_model("cifar_resnet20")
    macs = count_flops(model)
    assert macs.convention == "macs" and macs.flops == macs.macs
    assert {layer.type for layer in macs.layers} == {"Conv2d", "Linear"}
    ref = count_flops(model, convention="reference")
    assert ref.macs == macs.macs and ref.params == macs.params and ref.flops > 2 * macs.macs
    assert {"BatchNorm2d", "relu", "global_avg_pool"} <= {layer.type for layer in ref.layers}
    assert sum(layer.flops for layer in ref.layers) == ref.flops
    assert CONVENTIONS == ("macs", "reference")
    with pytest.raises(ValueError, match="unknown FLOPs convention 'paper'"):
        count_flops(model, convention="paper")


def test_l1_models_keep_the_papers_ratios_under_the_reference_convention() -> None:
    """docs/paper-settings.md §1.3's analytic r (computed with compute_flops) for the L1 models, to 4 digits."""
    paper = {("cifar_vgg16", "A"): 1.519, ("cifar_resnet56", "A"): 1.1156, ("cifar_resnet56", "B"): 1.3791,
             ("cifar_resnet110", "A"): 1.1883, ("cifar_resnet110", "B"): 1.6273}
    for (name, cfg), r in paper.items():
        with torch.device("meta"):
            ratio = flops_ratio(create_model(name), create_model(name, cfg=cfg), nonzero=False,
                                convention="reference")
        assert ratio == pytest.approx(r, abs=1.5e-4), (name, cfg)


# ---- ours vs reference on slimming and weight-level models pruned from random weights -------------------
def _slimmed(name: str, ratio: float, seed: int) -> tuple[nn.Module, nn.Module]:
    """Network Slimming's global threshold on random BN gammas over the zoo's channel groups (docs/paper-settings.md
    6.2: keep gamma > sorted[int(N p)]), the pruned model built from the kept widths and selections.

    The zoo's groups of the slimming PreResNet / DenseNet are in ``cfg`` order, one per entry."""
    torch.manual_seed(seed)
    model = create_model(name)
    groups = model.channel_groups()
    modules = dict(model.named_modules())
    gammas = [torch.rand(modules[g.bn].num_features) for g in groups]  # distinct: no ties
    scores = torch.cat(gammas).sort().values
    threshold = scores[int(scores.numel() * ratio)]
    kept = [torch.nonzero(gm > threshold).flatten().tolist() or [int(gm.argmax())] for gm in gammas]
    assert len(groups) == len(model.arch_kwargs()["cfg"])
    cfg = [len(k) for k in kept]
    select = [k for g, k in zip(groups, kept, strict=True) if g.selection is not None]
    return model, create_model(name, cfg=cfg, select=select)


def _epochs(dense: nn.Module, pruned: nn.Module, convention: str, nonzero: bool = False) -> int:
    r = flops_ratio(dense, pruned, nonzero=nonzero, convention=convention)
    return scratch_b_budget(160, r).epochs


@pytest.mark.parametrize("name,ratio", [("slim_preresnet164", 0.4), ("slim_densenet40", 0.6)])
def test_slimmed_models_get_fewer_epochs_under_the_reference_convention(name: str, ratio: float) -> None:
    """BN widths in front of a selection and ReLU/pool costs shrink less than the convs: reference r < ours."""
    dense, pruned = _slimmed(name, ratio, seed=0)
    ours, reference = _epochs(dense, pruned, "macs"), _epochs(dense, pruned, "reference")
    assert 0 < ours - reference < 20, (ours, reference)


def test_weight_level_preresnet110_gets_fewer_epochs_under_the_reference_convention() -> None:
    """r after the mask (docs/paper-settings.md §12.2): non-zero conv weights, dense BN, ReLU and FC."""
    torch.manual_seed(0)
    model = create_model("bearpaw_preresnet110")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    scores = torch.cat([m.weight.detach().abs().flatten() for m in convs])
    threshold = scores.sort().values[int(0.8 * scores.numel())]
    with torch.no_grad():
        for m in convs:
            m.weight.mul_((m.weight.abs() > threshold).float())
    dense = create_model("bearpaw_preresnet110")
    ours = _epochs(dense, model, "macs", nonzero=True)
    reference = _epochs(dense, model, "reference", nonzero=True)
    assert 10 < ours - reference < 40, (ours, reference)
