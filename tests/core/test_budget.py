"""Scratch-B budget (docs/paper-settings.md §1.3): epochs and LR milestones from FLOPs ratios measured on our zoo
models.

The ratios are not typed in: they are counted here (``count_flops`` of the unpruned model and of the paper's
named width config, or of the artifact that ``L1FilterPruning`` writes for that target), so the test
checks the zoo, the FLOPs counter and the budget rule together against the paper's epoch counts.
"""

from __future__ import annotations

import pytest
import torch

from callbacks import L1FilterPruning
from lit_prune.core.budget import ScratchBudget, scratch_b_budget
from lit_prune.core.flops import count_flops
from lit_prune.models import create_model


@pytest.fixture(autouse=True)
def _one_thread():
    # one image through a full-size model: a second thread only adds contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def measured_ratio(name: str, cfg: str) -> float:
    """FLOPs(unpruned) / FLOPs(named width config), at the family's native input size.

    Counted on the meta device: MACs depend on shapes only, and ImageNet VGG-16's 138M weights are
    not worth drawing. The artifact tests below count real tensors.
    """
    with torch.device("meta"):
        return count_flops(create_model(name)).macs / count_flops(create_model(name, cfg=cfg)).macs


# (model, width config, the paper's r (analytic, compute_flops), Scratch-B epochs, milestones); docs/paper-settings.md
# §1.3
CIFAR = [
    ("cifar_vgg16", "A", 1.519, 243, [121, 182]),
    ("cifar_resnet56", "A", 1.1156, 178, [89, 133]),
    ("cifar_resnet56", "B", 1.3791, 220, [110, 165]),
    ("cifar_resnet110", "A", 1.1883, 190, [95, 142]),
    ("cifar_resnet110", "B", 1.6273, 260, [130, 195]),
]


@pytest.mark.parametrize("name,cfg,paper_r,epochs,milestones", CIFAR, ids=[f"{n}-{c}" for n, c, *_ in CIFAR])
def test_cifar_l1_models_get_the_papers_epochs_exactly(name, cfg, paper_r, epochs, milestones) -> None:
    r = measured_ratio(name, cfg)
    # our counter (conv + linear MACs) differs from compute_flops.py by under 0.3% in r (design.md)
    assert r == pytest.approx(paper_r, rel=3e-3)
    budget = scratch_b_budget(160, r, rule="fractions")
    assert (budget.epochs, budget.milestones) == (epochs, milestones)
    assert budget.ratio == r and budget.factor == r


@pytest.mark.parametrize("name,target", [("cifar_vgg16", "A"), ("cifar_resnet56", "B")])
def test_l1_target_artifact_measures_the_same_ratio(name, target) -> None:
    """The ratio Scratch-B reads from the artifact of a real prune equals the width config's."""
    torch.manual_seed(0)
    art = L1FilterPruning(target=target, artifact_path=None).prune(create_model(name).eval())
    assert art.flops.ratio == pytest.approx(measured_ratio(name, target), rel=1e-9)
    expected = {("cifar_vgg16", "A"): 243, ("cifar_resnet56", "B"): 220}[(name, target)]
    assert scratch_b_budget(160, art.flops.ratio).epochs == expected


@pytest.mark.parametrize("name,target,epochs", [("cifar_resnet56", "A", 178), ("cifar_resnet110", "A", 190),
                                                ("cifar_resnet110", "B", 260), ("resnet34", "A", 106),
                                                ("resnet34", "B", 118)])
def test_l1_target_artifacts_of_the_other_models(name, target, epochs) -> None:
    torch.manual_seed(0)
    art = L1FilterPruning(target=target, artifact_path=None).prune(create_model(name).eval())
    imagenet = name == "resnet34"
    budget = scratch_b_budget(90 if imagenet else 160, art.flops.ratio,
                              rule="thirds" if imagenet else "fractions", cap=2.0 if imagenet else None)
    assert budget.epochs == epochs


# ImageNet (thirds, cap 2, base 90). The paper's r came from compute_flops.py (BN, ReLU and pooling counted
# too), so spec 1.3 only promises epochs within 2 of the paper's; ours are in fact equal.
IMAGENET = [
    ("resnet34", "A", 106, 35),
    ("resnet34", "B", 118, 39),
    ("vgg16", "thinet_conv", 180, 60),  # r = 3.23 > 2: capped
    ("vgg16", "5x", 180, 60),  # r = 4.40 > 2: capped
]


@pytest.mark.parametrize("name,cfg,epochs,step", IMAGENET, ids=[f"{n}-{c}" for n, c, *_ in IMAGENET])
def test_imagenet_models_get_the_papers_epochs(name, cfg, epochs, step) -> None:
    r = measured_ratio(name, cfg)
    budget = scratch_b_budget(90, r, rule="thirds", cap=2.0)
    assert abs(budget.epochs - epochs) <= 2
    assert budget.epochs == epochs  # tighter than the spec asks; holds for every model here
    assert budget.milestones == list(range(step, budget.epochs, step))
    if r >= 2:
        assert (budget.factor, budget.epochs, budget.milestones) == (2.0, 180, [60, 120])
    else:
        assert budget.factor == r


def test_imagenet_ratios_are_those_of_the_spec() -> None:
    assert measured_ratio("resnet34", "A") == pytest.approx(1.182, abs=1e-3)
    assert measured_ratio("resnet34", "B") == pytest.approx(1.315, abs=2e-3)
    assert measured_ratio("vgg16", "thinet_conv") == pytest.approx(3.23, abs=0.01)
    assert measured_ratio("vgg16", "5x") == pytest.approx(4.40, abs=0.01)


def test_cap_applies_at_and_above_the_cap_only() -> None:
    assert scratch_b_budget(90, 2.0, rule="thirds", cap=2.0).epochs == 180
    assert scratch_b_budget(90, 1.99, rule="thirds", cap=2.0).epochs == 179
    assert scratch_b_budget(90, 15.4, rule="thirds", cap=2.0).to_dict() == {
        "epochs": 180, "milestones": [60, 120], "ratio": 15.4, "factor": 2.0}
    # no cap on CIFAR: VGG-16-A and the like are stretched by the full ratio
    assert scratch_b_budget(160, 3.0).epochs == 480


def test_ratio_one_is_scratch_e() -> None:
    assert scratch_b_budget(160, 1.0) == ScratchBudget(160, [80, 120], 1.0, 1.0)
    assert scratch_b_budget(90, 1.0, rule="thirds").milestones == [30, 60]


def test_scale_rule_on_the_sfp_schedule() -> None:
    """SFP (spec 1.3, 12.7): the first milestone (LR x10 at epoch 1) stays, the others are stretched by r."""
    r = 1.2 / 0.85
    budget = scratch_b_budget(200, r, rule="scale", base_milestones=[1, 60, 120, 160])
    assert budget.milestones == [1, int(60 * r), int(120 * r), int(160 * r)] == [1, 84, 169, 225]
    assert budget.epochs == int(200 * r)
    # the reference's int(400 r) epochs with the 200-epoch milestones: base_epochs 400, same milestones
    ref = scratch_b_budget(400, r, rule="scale", base_milestones=[1, 60, 120, 160])
    assert ref.epochs == int(400 * r) and ref.milestones == budget.milestones


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.5, "cap": 0.5}, "cap"),
        ({"ratio": 0.9}, "ratio"),
        ({"ratio": 1.5, "rule": "quarters"}, "quarters"),
        ({"ratio": 1.5, "rule": "scale"}, "base_milestones"),
        ({"ratio": 1.5, "rule": "scale", "base_milestones": []}, "base_milestones"),
        ({"ratio": 1.5, "base_epochs": 0}, "base_epochs"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match) -> None:
    kwargs = {"base_epochs": 160, **kwargs}
    with pytest.raises(ValueError, match=match):
        scratch_b_budget(kwargs.pop("base_epochs"), kwargs.pop("ratio"), **kwargs)



@pytest.mark.parametrize(("ratio", "epochs", "milestones"), [
    (1.1775, 117, [35, 70, 105]), (1.4513, 145, [43, 86, 129]), (1.7951, 179, [53, 106, 159])])
def test_multiples_rule_gives_the_sss_schedules(ratio, epochs, milestones):
    # docs/paper-settings.md §1.3: SSS ResNet-41/32/26 from the 100-epoch schedule with steps at 30/60/90
    budget = scratch_b_budget(100, ratio, rule="multiples", base_milestones=[30, 60, 90])
    assert (budget.epochs, budget.milestones) == (epochs, milestones)
    with pytest.raises(ValueError, match="multiples of the first"):
        scratch_b_budget(100, ratio, rule="multiples", base_milestones=[30, 45])
