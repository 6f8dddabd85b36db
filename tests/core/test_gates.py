"""SSS block factors: the APG step by hand, gated model families, folding, and surgery on gated blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_prune.core.gates import BlockGate, apg_step_, block_gates, fold_gates_, scale_outputs_, soft_threshold
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import apply_masks
from lit_prune.core.surgery import prune_groups
from lit_prune.models import architecture, create_model
from tests.helpers import masks_from_keeps, randomize_bn

# (name, kwargs, input side, number of residual branches): tiny widths, every gated family
FAMILIES = {
    "cifar_resnet20": ("cifar_resnet20", {"cfg": [4, 0, 4, 8, 8, 8, 16, 16, 16]}, 32, 8),
    "sfp_resnet20": ("sfp_resnet20", {"cfg": [4] * 3 + [8] * 3 + [16] * 3}, 32, 9),
    "bearpaw_resnet50": ("bearpaw_resnet50", {"cfg": [2] * 24}, 32, 24),
    "resnet34": ("resnet34", {"cfg": [4] * 16}, 64, 16),
    "resnet50": ("resnet50", {"cfg": [[4, 3]] * 15 + [[0, 0]]}, 64, 15),
    "sss_resnet50": ("sss_resnet50", {"cfg": [[2, False], [4, True], [6, True], [3, True]], "widths": [[4, 3]] * 15},
                     64, 15),
}


def _gated(family: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, side, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = create_model(name, gates=True, **kwargs).eval()
    randomize_bn(model, seed)
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ---- the APG step ---------------------------------------------------------------------------------


def test_soft_threshold() -> None:
    z = torch.tensor([0.93, 0.04, -0.19, -0.03, 0.0])
    torch.testing.assert_close(soft_threshold(z, 0.05), torch.tensor([0.88, 0.0, -0.14, 0.0, 0.0]))


def test_apg_step_equals_hand_computation() -> None:
    # lr 0.1, gamma 0.5 (threshold 0.05), momentum 0.9; one column per case, each worked out by hand:
    #  a: plain shrink        z = 1 - 0.02 = 0.98 -> 0.93; v = -0.07; lam = 0.93 - 0.063 = 0.867
    #  b: thresholded to 0    z = 0.04 -> 0; v = -0.04; lam = -0.036 -> 0
    #  c: momentum below 0    v = -0.45; z = 0.3 -> 0.25; v = 0.25 - 0.3 - 0.45 = -0.5; lam = 0.25 - 0.45 -> 0
    #  d: negative z (sign)   z = 0.01 - 0.2 = -0.19 -> -0.14; v = -0.15; lam = -0.14 - 0.135 -> 0
    lam = torch.tensor([1.0, 0.04, 0.3, 0.01])
    grad = torch.tensor([0.2, 0.0, 0.0, 2.0])
    v = torch.tensor([0.0, 0.0, -0.5, 0.0])
    apg_step_(lam, grad, v, lr=0.1, gamma=0.5, momentum=0.9)
    torch.testing.assert_close(lam, torch.tensor([0.867, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(v, torch.tensor([-0.07, -0.04, -0.5, -0.15]))
    assert lam[1:].eq(0).all()  # exactly zero, not just small
    # a second step on case a, grad -0.1: v = -0.063; z = 0.877 -> 0.827; v = 0.827 - 0.867 - 0.063 = -0.103;
    # lam = 0.827 - 0.0927 = 0.7343 (momentum carries the first step on)
    lam, v = lam[:1].clone(), v[:1].clone()
    apg_step_(lam, torch.tensor([-0.1]), v, lr=0.1, gamma=0.5, momentum=0.9)
    torch.testing.assert_close(lam, torch.tensor([0.7343]))
    torch.testing.assert_close(v, torch.tensor([-0.103]))


def test_apg_step_without_penalty_and_momentum_is_plain_gradient_descent() -> None:
    lam, v = torch.tensor([1.0, 0.5]), torch.zeros(2)
    apg_step_(lam, torch.tensor([0.3, -0.2]), v, lr=0.5, gamma=0.0, momentum=0.0)
    torch.testing.assert_close(lam, torch.tensor([0.85, 0.6]))


# ---- gated families -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gates_are_opt_in_and_rebuild_from_the_architecture(family: str) -> None:
    name, kwargs, side, branches = FAMILIES[family]
    plain = create_model(name, **kwargs)
    assert not block_gates(plain) and "gates" not in architecture(plain)["kwargs"]
    assert not any("gate" in k for k in plain.state_dict())

    model, x = _gated(family)
    gates = block_gates(model)
    assert len(gates) == branches  # one per residual branch; a block without a branch has none
    assert all(g.value == 1.0 and g.weight.dim() == 0 for g in gates.values())
    assert set(model.state_dict()) == set(plain.state_dict()) | {f"{p}.weight" for p in gates}
    assert architecture(model)["kwargs"]["gates"] is True
    # with every factor at 1 the gated model is the plain one
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "gate" not in k})
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain.eval()(x))
    # the description rebuilds the same parameters
    arch = architecture(model)
    rebuilt = create_model(arch["name"], **arch["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fold_gates_is_exact_and_ungates_the_description(family: str) -> None:
    model, x = _gated(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in block_gates(model).values():
            gate.weight.fill_(float(torch.rand((), generator=g)) * 2)
    with torch.no_grad():
        before = model(x)
        folded = copy.deepcopy(model)
        fold_gates_(folded)
        torch.testing.assert_close(folded(x), before, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(before, _gated(family)[0](x), atol=1e-3)  # the factors did matter
    assert not block_gates(folded)
    arch = architecture(folded)
    assert "gates" not in arch["kwargs"] and "gates" in architecture(model)["kwargs"]  # the original is untouched
    create_model(arch["name"], **arch["kwargs"]).load_state_dict(folded.state_dict())


@pytest.mark.parametrize("family", ["cifar_resnet20", "resnet50", "sss_resnet50"])
def test_removing_a_gated_branch_removes_its_gate_and_masks_simulate_it(family: str) -> None:
    model, x = _gated(family)
    group = next(g for g in channel_groups(model) if g.name.startswith("layer2.0."))
    gate = group.branch[-1]
    assert gate == "layer2.0.gate"
    keeps = {group.name: torch.zeros(group_size(model, group), dtype=torch.bool)}
    masked = copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, keeps))
    assert masked.get_submodule(gate).value == 0.0
    pruned = copy.deepcopy(model)
    prune_groups(pruned, keeps)
    assert "layer2.0.gate" not in block_gates(pruned) and len(block_gates(pruned)) == len(block_gates(model)) - 1
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
    arch = architecture(pruned)
    create_model(arch["name"], **arch["kwargs"]).load_state_dict(pruned.state_dict())


def test_scale_outputs_refuses_what_cannot_absorb_a_factor() -> None:
    with pytest.raises(TypeError, match="without affine"):
        scale_outputs_(nn.BatchNorm2d(3, affine=False), 0.5)
    with pytest.raises(TypeError, match="ReLU"):
        scale_outputs_(nn.ReLU(), 0.5)
    gate = BlockGate()
    assert "lambda=1" in repr(gate)
