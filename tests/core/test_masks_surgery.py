"""Masks and physical surgery: the masked model computes what the physically pruned model computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core.groups import ChannelGroup, channel_groups, group_size
from lit_prune.core.masks import apply_masks, group_masks, mask_gradients, merge, sparsity
from lit_prune.core.surgery import prune_group, prune_groups
from lit_prune.models import architecture, create_model
from tests.helpers import masks_from_keeps, randomize_bn

R34_SMALL = [w // 8 for w in [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3]
R50_SMALL = [[w // 8, w // 8 + 1] for w in [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3]
# block-input channels read by each Bottleneck's conv1 (block inputs: 64, then 256 x 3, 512 x 4, ...)
R50_SELECT = [list(range(0, 64, 2)), None, list(range(1, 256, 3)), list(range(0, 256, 2))] + [None] * 12


class TinyChain(nn.Module):
    """conv1-bn1-relu-conv2-bn2-relu-pool(2x2)-flatten-fc: plain chains, one read through a flatten."""

    input_size = (3, 8, 8)

    def __init__(self, c1: int = 4, c2: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 4, num_classes)  # each channel owns 2 x 2 = 4 columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))

    def channel_groups(self) -> list[ChannelGroup]:
        return [
            ChannelGroup("conv1", producers=("conv1", "bn1"), consumers=("conv2",), bn="bn1", conv="conv1"),
            ChannelGroup("conv2", producers=("conv2", "bn2"), consumers=("fc",), bn="bn2", conv="conv2"),
        ]


def _random_keeps(model: nn.Module, zero: str | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """About half of every group, at least one channel, except group ``zero`` which loses everything."""
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    for group in channel_groups(model):
        keep = torch.rand(group_size(model, group), generator=g) < 0.5
        keep[torch.randint(0, keep.numel(), (1,), generator=g)] = True
        keeps[group.name] = torch.zeros_like(keep) if group.name == zero else keep
    return keeps


def _masked_and_pruned(model: nn.Module, keeps: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    masked = copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, keeps))
    pruned = copy.deepcopy(model)
    prune_groups(pruned, keeps)
    return masked.eval(), pruned.eval()


# ---- masked == physically pruned -----------------------------------------------------------------

CASES = [
    # name, kwargs, input (C, H, W), group pruned to zero channels (a residual branch)
    ("cifar_resnet20", {}, (3, 32, 32), "layer1.1.conv1"),
    ("sfp_resnet20", {}, (3, 32, 32), "layer2.0.conv1"),  # the stride-2 block: only its shortcut stays
    ("resnet34", {"cfg": R34_SMALL, "num_classes": 10}, (3, 64, 64), "layer3.2.conv1"),
    # conv2 of a Bottleneck to zero: the whole branch goes although its conv1 and select groups keep some
    ("resnet50", {"cfg": R50_SMALL, "select": R50_SELECT, "num_classes": 10}, (3, 64, 64), "layer1.2.conv2"),
]


@pytest.mark.parametrize("name, kwargs, input_size, zero", CASES, ids=[c[0] for c in CASES])
def test_masked_model_equals_physically_pruned_model(name, kwargs, input_size, zero) -> None:
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    randomize_bn(model)
    keeps = _random_keeps(model, zero)
    assert zero in keeps and any(g.selection for g in channel_groups(model)) == ("select" in kwargs)
    masked, pruned = _masked_and_pruned(model, keeps)

    x = torch.randn(2, *input_size)
    with torch.no_grad():
        out_full, out_masked, out_pruned = model(x), masked(x), pruned(x)
    torch.testing.assert_close(out_pruned, out_masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out_full, out_masked, atol=1e-2)  # the pruning did change the function

    # the pruned model is smaller, and the zeroed branch is gone
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    block = pruned.get_submodule(zero.rsplit(".", 1)[0])
    assert getattr(block, "conv1", None) is None
    for group in channel_groups(pruned):
        assert group_size(pruned, group) == int(keeps[group.name].sum())

    # architecture() describes the pruned weights: a fresh model loads them strictly and agrees
    arch = architecture(pruned)
    rebuilt = create_model(arch["name"], **arch["kwargs"]).eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), out_pruned)


def test_pruned_widths_are_read_back_into_cfg() -> None:
    model = create_model("cifar_resnet20")
    keeps = _random_keeps(model, zero="layer3.0.conv1", seed=3)
    prune_groups(model, keeps)
    assert architecture(model)["kwargs"]["cfg"] == [int(k.sum()) for k in keeps.values()]
    assert architecture(model)["kwargs"]["cfg"][6] == 0


def test_surgery_keeps_the_selected_filters_in_order() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    w1 = model.layer2[1].conv1.weight.detach().clone()
    w2 = model.layer2[1].conv2.weight.detach().clone()
    keep = torch.zeros(32, dtype=torch.bool)
    keep[[3, 7, 30]] = True
    prune_groups(model, {"layer2.1.conv1": keep})
    torch.testing.assert_close(model.layer2[1].conv1.weight, w1[[3, 7, 30]])
    torch.testing.assert_close(model.layer2[1].conv2.weight, w2[:, [3, 7, 30]])
    assert model.layer2[1].bn1.running_mean.shape == (3,) and model.layer2[1].bn1.num_features == 3


def test_chain_with_linear_consumer_masked_equals_pruned() -> None:
    torch.manual_seed(0)
    model = TinyChain().eval()
    randomize_bn(model)
    keeps = {"conv1": torch.tensor([True, False, True, False]),
             "conv2": torch.tensor([False, True, True, False, False, True])}
    masked, pruned = _masked_and_pruned(model, keeps)
    assert pruned.fc.in_features == 3 * 4 and pruned.conv2.bias.shape == (3,)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x))


def test_plain_chain_pruned_to_zero_is_refused() -> None:
    model = TinyChain()
    group = channel_groups(model)[0]
    with pytest.raises(ValueError, match="not a residual branch"):
        prune_group(model, group, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a residual branch"):
        prune_groups(model, {"conv2": torch.zeros(6, dtype=torch.bool)})
    assert model.conv1.out_channels == 4 and model.conv2.out_channels == 6  # left untouched


def test_surgery_argument_errors() -> None:
    model = TinyChain()
    with pytest.raises(ValueError, match="has 4 channels but the keep mask has 3"):
        prune_group(model, channel_groups(model)[0], torch.ones(3, dtype=torch.bool))
    with pytest.raises(KeyError, match="no prunable group named conv9"):
        prune_groups(model, {"conv9": torch.ones(4, dtype=torch.bool)})
    # a model without declared groups is traced: a conv whose channels are the model output is never cut
    assert channel_groups(nn.Sequential(nn.Conv2d(3, 4, 3))) == []


# ---- masks ---------------------------------------------------------------------------------------


def _chain_masks(model: TinyChain) -> dict[str, torch.Tensor]:
    groups = channel_groups(model)
    return merge(group_masks(model, groups[0], torch.tensor([True, False, True, False])),
                 group_masks(model, groups[1], torch.tensor([True] * 5 + [False])))


def test_group_masks_cover_producers_and_bn() -> None:
    model = TinyChain()
    masks = _chain_masks(model)
    assert set(masks) == {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "conv2.bias", "bn2.weight",
                          "bn2.bias"}
    assert masks["conv1.weight"].shape == (4, 1, 1, 1)
    only_filters = group_masks(model, channel_groups(model)[0], torch.tensor([True, False, True, False]),
                               filters_only=True)
    assert set(only_filters) == {"conv1.weight"}  # SFP: BN untouched
    apply_masks(model, masks)
    # masked out: conv1 2 x 27, bn1 2 + 2, conv2 1 x 36, its bias 1, bn2 1 + 1; of 108 + 8 + 216 + 6 + 12
    assert sparsity(model, masks) == pytest.approx(97 / 350)


def test_merge_keeps_only_what_both_keep() -> None:
    a = {"w": torch.tensor([True, True, False])}
    b = {"w": torch.tensor([True, False, True]), "v": torch.tensor([False])}
    merged = merge(a, b)
    assert merged["w"].tolist() == [True, False, False] and merged["v"].tolist() == [False]
    assert a["w"].tolist() == [True, True, False]  # inputs untouched


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, masks=None, check=None) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        loss = model(x).square().mean() + model(x).sum() * 0.01
        opt.zero_grad()
        loss.backward()
        if masks is not None:
            mask_gradients(model, masks)
        opt.step()
        if check is not None:
            check()
        if masks is not None:
            apply_masks(model, masks, opt)


def _masked_values(model: nn.Module, masks) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[~m.expand_as(params[n])] for n, m in masks.items()])


def test_apply_masks_zeroes_weights_and_momentum() -> None:
    torch.manual_seed(0)
    model = TinyChain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _train_steps(model, opt, 3)  # builds momentum everywhere
    masks = _chain_masks(model)
    buffers = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    assert all(bool((b[~masks[n].expand_as(b)] != 0).any()) for n, b in buffers.items() if n in masks)
    apply_masks(model, masks, opt)
    for name, m in masks.items():
        p = dict(model.named_parameters())[name]
        assert torch.all(p[~m.expand_as(p)] == 0), name
        assert torch.all(buffers[name][~m.expand_as(p)] == 0), f"momentum of {name}"
        assert bool((p[m.expand_as(p)] != 0).any()), f"kept entries of {name} were zeroed"


def test_masked_weights_stay_exactly_zero_under_momentum_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = TinyChain()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    _train_steps(model, opt, 3)
    masks = _chain_masks(model)
    apply_masks(model, masks, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # right after each step, before re-masking: zero already, because gradient and momentum are masked
    def check() -> None:
        assert torch.all(_masked_values(model, masks) == 0)

    _train_steps(model, opt, 25, masks=masks, check=check)
    assert torch.all(_masked_values(model, masks) == 0)
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])  # the kept weights did train


def test_masks_without_momentum_reset_would_leak() -> None:
    """Control for the test above: zeroing weights but not the momentum lets them come back."""
    torch.manual_seed(0)
    model = TinyChain()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train_steps(model, opt, 3)
    masks = _chain_masks(model)
    apply_masks(model, masks)  # no optimizer: its momentum buffers keep their values
    _train_steps(model, opt, 1, masks={k: torch.ones_like(v) for k, v in masks.items()})
    assert bool((_masked_values(model, masks) != 0).any())


def test_apply_masks_refuses_unknown_parameter() -> None:
    with pytest.raises(KeyError, match="matches no parameter"):
        apply_masks(TinyChain(), {"conv7.weight": torch.ones(1, dtype=torch.bool)})
