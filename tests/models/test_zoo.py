"""Properties every registered model has, checked by looping over ``list_models()`` (as timm's tests do).

For each model, at its own input size and with small widths where the family has a width knob:

* forward and backward run, every parameter gets a finite gradient;
* ``architecture(model)`` rebuilds it: ``create_model(name, **kwargs)`` has the same state-dict shapes;
* masked equals pruned: for a random keep of every prunable channel group, the group masks applied to one
  copy and ``prune_groups`` on another give the same eval-mode outputs (random BN statistics, so that a
  forgotten BN shift or running mean shows), and the pruned model round-trips through its architecture.

Family-specific properties (the paper's default widths, reference-code agreement, FLOPs ratios) stay in
the family's own test module.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import pytest
import torch
from torch import nn

from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import apply_masks
from lit_prune.core.surgery import prune_groups
from lit_prune.models import architecture, create_model, list_models
from tests.helpers import masks_from_keeps, randomize_bn

NUM_CLASSES = 5

#: families whose ``cfg`` is a list of conv widths: every width divided by this factor (at least 2)
SHRINK = {"cifar_resnet*": 4, "sfp_resnet*": 4, "bearpaw_resnet50": 4, "resnet34": 8, "resnet50": 8,
          "*vgg*": 8, "vgg16*": 16, "slim_vgg11_bn": 16}
#: families whose width follows from a depth or growth argument, or that have their own width knob
TINY: dict[str, dict[str, Any]] = {
    "bearpaw_preresnet": {"depth": 11},
    "slim_preresnet": {"depth": 11},
    "slim_densenet": {"depth": 7, "growth": 4},
    "densenet": {"depth": 16, "growth": 4, "bottleneck": True, "compression": 0.5},  # two layers per block
    "sss_resnet50": {"widths": [[2, 3]] * 16},
}
#: fixed depth and widths that are the stream's (nothing to shrink): full size, a few seconds each
FULL = {"bearpaw_preresnet110", "slim_preresnet164", "densenet40", "slim_densenet40", "densenet_bc100",
        "densenet_c100"}
#: depth 100 and more: 10-20 s each on a loaded 2-core machine; their shallow siblings run by default
SLOW = {"cifar_resnet110", "sfp_resnet110", "bearpaw_preresnet110", "slim_preresnet164", "densenet_bc100",
        "densenet_c100"}


def _shrink(value: Any, factor: int) -> Any:
    """``value`` with every width divided by ``factor``; pooling markers ("M") and flags stay."""
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        return value
    if isinstance(value, int):
        return max(2, value // factor)
    return [_shrink(v, factor) for v in value]


def _factor(name: str) -> int | None:
    # the last matching pattern wins, so that a specific name overrides its family's pattern
    matches = [f for pattern, f in SHRINK.items() if fnmatch.fnmatch(name, pattern)]
    return matches[-1] if matches else None


def small_kwargs(name: str) -> dict[str, Any]:
    """Constructor arguments of a small instance of ``name`` (empty: the registered size)."""
    if name in TINY:
        return TINY[name]
    factor = _factor(name)
    if factor is None:
        return {}
    with torch.device("meta"):  # the default widths, without allocating a full-size model
        kwargs = architecture(create_model(name))["kwargs"]
    return {k: _shrink(v, factor) for k, v in kwargs.items() if k in ("cfg", "fc_widths")}


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


MODELS = [_param(name) for name in list_models()]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _random_keeps(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random keep vector per prunable group, keeping at least one channel of each."""
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    for group in channel_groups(model):
        keep = torch.rand(group_size(model, group), generator=g) < 0.5
        keep[torch.randint(keep.numel(), (1,), generator=g)] = True
        keeps[group.name] = keep
    return keeps


def test_every_registered_model_has_a_size() -> None:
    """A new model is either shrunk (a SHRINK pattern or a TINY entry) or knowingly full size."""
    unsized = [n for n in list_models() if n not in TINY and _factor(n) is None and n not in FULL]
    assert not unsized, f"give these models small kwargs in TINY or SHRINK (or list them in FULL): {unsized}"
    assert set(TINY) | FULL | SLOW <= set(list_models())


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"num_classes": NUM_CLASSES, **small_kwargs(name)}
    model = create_model(name, **kwargs)

    # forward and backward at the model's own input size
    x = torch.randn(2, *model.input_size)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname

    # the architecture describes the weights
    arch = architecture(model)
    assert arch["name"] == name
    assert _shapes(create_model(name, **arch["kwargs"])) == _shapes(model)

    # masked equals pruned, in float64 so that deep models compare to rounding
    dense_macs = count_flops(model).macs
    model = model.double()
    randomize_bn(model)
    model.eval()
    keeps = _random_keeps(model)
    if not keeps:  # e.g. a DenseNet without channel selections: nothing is prunable
        return
    masked = copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, keeps))
    pruned = copy.deepcopy(model)
    prune_groups(pruned, keeps)
    assert count_flops(copy.deepcopy(pruned).float()).macs < dense_macs
    x = x.double()
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(pruned(x), expected)
        # the pruned model is still described by its architecture: rebuilt, it loads the pruned weights
        arch = architecture(pruned)
        rebuilt = create_model(arch["name"], **arch["kwargs"]).double().eval()
        assert _shapes(rebuilt) == _shapes(pruned)
        rebuilt.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(rebuilt(x), expected)
