"""One global-threshold routine for every global method: exactly k removed by default, the reference's k + 1
on request."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_prune.core.selection import threshold_keep
from lit_prune.methods.magnitude import MagnitudeMasks
from lit_prune.methods.slimming import BNScaleSlimming
from lit_prune.models import create_model


def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.8])
def test_magnitude_exact_removes_k_and_reference_removes_k_plus_one(amount: float) -> None:
    model = _conv_model()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    k = int(n * amount)
    removed = {rule: sum(int((~m).sum()) for m in MagnitudeMasks(amount, threshold=rule).compute_masks(model, amount)
                         .values()) for rule in ("exact", "reference")}
    assert removed == {"exact": k, "reference": k + 1}  # random weights: no ties


def test_magnitude_reference_rule_is_the_reference_codes_threshold() -> None:
    model = _conv_model(1)
    weights = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    thr = torch.sort(weights).values[int(weights.numel() * 0.6)]  # the reference: y, i = sort(|w|); thre = y[k]
    masks = MagnitudeMasks(0.6, threshold="reference").compute_masks(model, 0.6)
    for name, m in masks.items():
        w = model.get_submodule(name.removesuffix(".weight")).weight.detach().abs()
        assert torch.equal(m, w > thr)


def test_slimming_rules_differ_by_one_channel_and_reference_is_sorted_k() -> None:
    torch.manual_seed(0)
    model = create_model("slim_vgg11", cfg=[8, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.1, 1.0)
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    k = int(gammas.numel() * 0.3)
    kept = {rule: sum(int(v.sum()) for v in BNScaleSlimming(prune_ratio=0.3, threshold=rule).keeps(model).values())
            for rule in ("exact", "reference")}
    assert kept == {"exact": gammas.numel() - k, "reference": gammas.numel() - k - 1}


def test_non_finite_scores_and_unknown_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="1 of 3 scores are NaN or infinite"):
        threshold_keep([torch.tensor([1.0, float("nan"), 2.0])], 1)
    with pytest.raises(ValueError, match="unknown threshold rule 'median'"):
        threshold_keep([torch.ones(3)], 1, rule="median")
    with pytest.raises(ValueError, match="threshold must be one of exact, reference"):
        MagnitudeMasks(0.5, threshold="paper")
