"""Scoring (lit_prune.core.importance) and selection (lit_prune.core.selection) on hand-built tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_prune.core.groups import channel_groups
from lit_prune.core.importance import bn_gamma, criterion_names, filter_l1, filter_l2, group_scores
from lit_prune.core.selection import (
    apply_floor,
    check_patterns,
    check_ratio,
    global_threshold,
    ratio_for,
    top_k,
)
from lit_prune.models import create_model

# ---- criteria ------------------------------------------------------------------------------------


def test_filter_l1_and_l2_on_hand_built_weights() -> None:
    # (C_out=3, C_in=2, 1, 2): filter 0 = [1, -2, 3, -4], filter 1 = zeros, filter 2 = [0, 0, 0, -5]
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -5.0]]).reshape(3, 2, 1, 2)
    torch.testing.assert_close(filter_l1(w), torch.tensor([10.0, 0.0, 5.0]))
    torch.testing.assert_close(filter_l2(w), torch.tensor([30.0**0.5, 0.0, 5.0]))


def test_bn_gamma_is_absolute_value() -> None:
    torch.testing.assert_close(bn_gamma(torch.tensor([-3.0, 0.5, 0.0, 2.0])), torch.tensor([3.0, 0.5, 0.0, 2.0]))


def test_criteria_do_not_track_gradients() -> None:
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    assert not filter_l1(w).requires_grad and not filter_l2(w).requires_grad


def test_group_scores_read_the_groups_conv_and_bn() -> None:
    model = create_model("cifar_resnet20")
    group = next(g for g in channel_groups(model) if g.name == "layer2.1.conv1")
    conv = model.get_submodule(group.conv)  # (32, 32, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(32.0).flip(0).reshape(32, 1, 1, 1).expand_as(conv.weight))
        model.get_submodule(group.bn).weight.copy_(-torch.arange(32.0))
    torch.testing.assert_close(group_scores(model, group, "l1"), torch.arange(32.0).flip(0) * 32 * 9)
    torch.testing.assert_close(group_scores(model, group, "bn_gamma"), torch.arange(32.0))
    assert {"l1", "l2", "bn_gamma"} <= set(criterion_names())
    with pytest.raises(KeyError, match="unknown criterion"):
        group_scores(model, group, "taylor_typo")


# ---- top_k ---------------------------------------------------------------------------------------


def test_top_k_tie_rule_keeps_higher_index_first() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    # numpy stable argsort ascending: [4, 0, 1, 2, 3]; reversed: [3, 2, 1, 0, 4]
    assert top_k(scores, 2).tolist() == [False, False, True, True, False]
    assert top_k(scores, 3).tolist() == [False, True, True, True, False]
    assert top_k(scores, 4).tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_matches_numpy_stable_argsort_reversed(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (23,), generator=g).float()  # many ties
    for k in range(24):
        expected = np.zeros(23, dtype=bool)
        expected[np.argsort(scores.numpy(), kind="stable")[::-1][:k]] = True
        assert top_k(scores, k).numpy().tolist() == expected.tolist()


def test_top_k_bounds() -> None:
    scores = torch.rand(5)
    assert not top_k(scores, 0).any()
    assert top_k(scores, 5).all()
    for k in (-1, 6):
        with pytest.raises(ValueError, match=r"\[0, 5\]"):
            top_k(scores, k)


# ---- global threshold ----------------------------------------------------------------------------


def test_global_threshold_keeps_strictly_greater_and_prunes_ties() -> None:
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0])]
    # all sorted: [1, 2, 2, 3, 4]; index int(5 * 0.4) = 2 -> threshold 2; both 2s are pruned
    keep = global_threshold(scores, 0.4, rule="reference")
    assert [k.tolist() for k in keep] == [[False, False, True], [False, True]]
    assert all(k.dtype == torch.bool for k in keep)
    # 60% pruned although 40% was asked: the tie at the threshold goes too
    assert sum(int((~k).sum()) for k in keep) == 3


def test_global_threshold_is_one_threshold_across_layers() -> None:
    small, large = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([10.0, 20.0, 30.0, 40.0])
    keep_small, keep_large = global_threshold([small, large], 0.5, rule="reference")
    # threshold = sorted[4] = 10: every channel of the small layer goes, the large layer loses only 10
    assert not keep_small.any()
    assert keep_large.tolist() == [False, True, True, True]
    # the exact rule removes exactly int(8 * 0.5) = 4: threshold sorted[3] = 0.4, the large layer stays whole
    keep_small, keep_large = global_threshold([small, large], 0.5)
    assert not keep_small.any() and keep_large.all()


def test_global_threshold_checks_ratio() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        global_threshold([torch.rand(4)], 1.0)


# ---- floor ---------------------------------------------------------------------------------------


def test_apply_floor_adds_the_best_channels() -> None:
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    nothing = torch.zeros(4, dtype=torch.bool)
    assert apply_floor(scores, nothing, 2).tolist() == [False, True, False, True]
    assert apply_floor(scores, nothing, 0).tolist() == [False] * 4
    assert apply_floor(scores, nothing, 10).all()  # a floor above the width keeps everything
    some = torch.tensor([True, False, True, False])  # already two: left as is even if not the best
    assert apply_floor(scores, some, 2).tolist() == some.tolist()
    one = torch.tensor([False, False, True, False])
    assert apply_floor(scores, one, 2).tolist() == [False, True, True, True]  # the kept one stays


# ---- ratio and pattern checks --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_check_ratio_refuses_values_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)") as err:
        check_ratio(bad)
    assert "prune_ratio" in str(err.value)


def test_check_ratio_accepts_zero_and_fractions() -> None:
    assert check_ratio(0) == 0.0
    assert check_ratio(0.5) == 0.5
    with pytest.raises(ValueError, match="amount"):
        check_ratio(2, name="amount")


def test_ratio_for_uses_first_matching_pattern() -> None:
    ratios = {"layer1.*": 0.6, "layer*": 0.3}
    assert ratio_for("layer1.3.conv1", ratios) == 0.6
    assert ratio_for("layer2.3.conv1", ratios) == 0.3
    assert ratio_for("fc", ratios) is None
    assert ratio_for("fc", ratios, default=0.0) == 0.0
    assert ratio_for("anything", 0.25) == 0.25


def test_check_patterns_refuses_unknown_layer_pattern() -> None:
    names = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]
    check_patterns(["layer1.*", "layer2.0.conv1"], names, "skip")  # all match: no error
    with pytest.raises(ValueError, match=r"skip pattern 'layer9\.\*' matches no prunable layer") as err:
        check_patterns(["layer1.*", "layer9.*"], names, "skip")
    assert "layer1.0.conv1" in str(err.value)  # shows what names look like
