"""PreResNet family: shapes, init, sizes, channel selections, width configs, argument validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import apply_masks, group_masks, merge
from lit_prune.core.surgery import prune_groups
from lit_prune.models import ChannelSelection, architecture, create_model, list_models
from lit_prune.models.cifar_preresnet import PreResNet

# depth 11 = 9 * 1 + 2: one bottleneck block per stage, selection points see 16, 64, 128 and 256 channels
TINY = {"slim_preresnet": {"depth": 11}, "bearpaw_preresnet": {"depth": 11}}
FULL = {"slim_preresnet164": 164, "bearpaw_preresnet110": 110}

# a pruned depth-11 slim config: per block [reads, conv1 out, conv2 out], then the classifier's input width
TINY_SELECT = [[0, 3, 5, 15], list(range(0, 64, 3)), [1, 2, 127], list(range(10, 250, 7))]
TINY_CFG = [4, 5, 6, 22, 7, 9, 3, 20, 11, len(TINY_SELECT[3])]


def _randomize(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running stats, so that equivalence tests see every channel."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g)
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model.eval()


def _consumers(model: PreResNet) -> list[nn.Module]:
    """The layer reading each selection point: every block's conv1, then the classifier."""
    return [b.conv1 for b in model.blocks()] + [model.fc]


def test_every_registered_model_is_tested() -> None:
    assert set(list_models("*preresnet*")) == set(TINY) | set(FULL)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_forward_backward(name: str) -> None:
    model = create_model(name, num_classes=100)
    assert model.depth == FULL[name]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_slim_preresnet164_default_cfg_is_the_papers() -> None:
    cfg = create_model("slim_preresnet164").arch_kwargs()["cfg"]
    expected = (
        [16, 16, 16] + [64, 16, 16] * 17 + [64, 32, 32] + [128, 32, 32] * 17
        + [128, 64, 64] + [256, 64, 64] * 17 + [256]
    )  # fmt: skip
    assert len(cfg) == 163
    assert cfg == expected


def test_bearpaw_preresnet110_layout() -> None:
    model = create_model("bearpaw_preresnet110")
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3)] == [12, 12, 12]
    # 3 stages x 12 blocks x 3 convs + stem + fc = 110 layers (downsample convs are not counted)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) - 3 + 1 == 110
    assert not any(isinstance(m, ChannelSelection) for m in model.modules())
    assert not any(k.endswith("indices") for k in model.state_dict())
    assert "select" not in model.arch_kwargs()


@pytest.mark.parametrize("name, gamma", [("slim_preresnet", 0.5), ("bearpaw_preresnet", 1.0)])
def test_init_scheme(name: str, gamma: float) -> None:
    model = create_model(name, depth=20)  # n = 2
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == gamma) and torch.all(m.bias == 0) for m in bns)
    conv = model.layer3[1].conv2  # 3x3, 64 -> 64: He fan-out std = sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)


def test_downsample_is_a_strided_1x1_conv_on_the_first_block_only() -> None:
    model = create_model("slim_preresnet", depth=20)
    stages = ((model.layer1, 1, 16, 64), (model.layer2, 2, 64, 128), (model.layer3, 2, 128, 256))
    for layer, stride, c_in, c_out in stages:
        ds = layer[0].downsample
        assert isinstance(ds, nn.Conv2d) and ds.kernel_size == (1, 1) and ds.bias is None
        assert (ds.stride, ds.in_channels, ds.out_channels) == ((stride, stride), c_in, c_out)
        assert layer[0].conv2.stride == (stride, stride)
        assert layer[1].downsample is None


def test_slim_preresnet164_params_match_network_slimming() -> None:
    # Network Slimming (Table 1) reports 1.70M parameters (BN included); we count 1,703,258
    model = create_model("slim_preresnet164", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.70e6, rel=0.01)


def test_slim_preresnet164_flops_match_network_slimming() -> None:
    report = count_flops(create_model("slim_preresnet164", num_classes=10))
    # Network Slimming (Table 1) reports 4.99e8 FLOPs; its counter doubles multiply-adds and also counts
    # BN and ReLU, ours counts conv/linear MACs only: 2.476e8 vs 2.495e8.
    assert report.params == pytest.approx(1.70e6, rel=0.01)
    assert report.macs == pytest.approx(4.99e8 / 2, rel=0.01)


def test_parameters_exclude_selection_indices() -> None:
    model = create_model("slim_preresnet", depth=11, cfg=TINY_CFG, select=TINY_SELECT)
    assert count_flops(model).params == sum(p.numel() for p in model.parameters())
    assert not any("indices" in name for name, _ in model.named_parameters())
    keys = [k for k in model.state_dict() if k.endswith("select.indices")]
    assert len(keys) == 4
    assert model.state_dict()["select.indices"].tolist() == TINY_SELECT[3]


def test_selection_shrinks_what_the_convs_read() -> None:
    model = create_model("slim_preresnet", depth=11, cfg=TINY_CFG, select=TINY_SELECT)
    assert [c.weight.shape[1] for c in _consumers(model)] == [4, 22, 3, len(TINY_SELECT[3])]
    assert [b.conv1.out_channels for b in model.blocks()] == [5, 7, 20]
    assert [b.bn1.num_features for b in model.blocks()] == [16, 64, 128]  # the stream keeps its width
    assert model.bn.num_features == 256
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_architecture_round_trip() -> None:
    model = create_model("slim_preresnet", depth=11, num_classes=5, cfg=TINY_CFG, select=TINY_SELECT)
    _randomize(model)
    arch = architecture(model)
    assert arch["kwargs"]["cfg"] == TINY_CFG
    assert arch["kwargs"]["select"] == TINY_SELECT
    rebuilt = create_model(arch["name"], **arch["kwargs"]).eval()
    sd, rsd = model.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in rsd.items()}
    assert all(torch.equal(sd[k], rsd[k]) for k in sd if k.endswith("indices"))
    rebuilt.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_default_architecture_is_compact() -> None:
    arch = architecture(create_model("slim_preresnet", depth=11))
    assert arch["kwargs"]["select"] is None
    assert arch["kwargs"]["depth"] == 11


def test_select_all_equals_no_selection() -> None:
    plain = _randomize(create_model("slim_preresnet", depth=11))
    full = [list(range(c)) for c in (16, 64, 128, 256)]
    explicit = create_model("slim_preresnet", depth=11, select=full).eval()
    explicit.load_state_dict(plain.state_dict())
    bearpaw = create_model("bearpaw_preresnet", depth=11).eval()
    bearpaw.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.endswith("indices")})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(explicit(x), plain(x))
    torch.testing.assert_close(bearpaw(x), plain(x))


def test_selection_reads_the_selected_channels() -> None:
    """A selecting model equals the full model whose readers have zero weights on unselected channels."""
    pruned = _randomize(create_model("slim_preresnet", depth=11, cfg=TINY_CFG, select=TINY_SELECT))
    # the full model keeps the pruned inner widths but reads the whole stream everywhere
    cfg = list(TINY_CFG)
    cfg[0:10:3] = [16, 64, 128, 256]
    full = create_model("slim_preresnet", depth=11, cfg=cfg).eval()
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    state = {k: v for k, v in pruned.state_dict().items() if shapes.get(k) == v.shape}
    full.load_state_dict(state, strict=False)  # every tensor but the readers' weights
    with torch.no_grad():
        for src, dst, idx in zip(_consumers(pruned), _consumers(full), TINY_SELECT, strict=True):
            dst.weight.zero_()
            dst.weight[:, idx] = src.weight
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(full(x), pruned(x))


def test_zero_width_block_becomes_its_shortcut() -> None:
    cfg = create_model("slim_preresnet", depth=20).arch_kwargs()["cfg"]
    cfg[3:6] = [0, 16, 16]  # block 2 of stage 1: no residual branch
    cfg[9:12] = [64, 0, 32]  # block 2 of stage 2
    model = create_model("slim_preresnet", depth=20, cfg=cfg).eval()
    block = model.layer1[1]
    assert block.conv1 is None and block.bn1 is None and block.select is None
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(block(x), x)
    arch = architecture(model)["kwargs"]
    assert arch["cfg"][3:6] == [0, 0, 0] and arch["cfg"][9:12] == [0, 0, 0]
    assert arch["select"][1] == [] and arch["select"][3] == [] and arch["select"][0] is None
    rebuilt = create_model("slim_preresnet", **arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 12}, r"9n\+2"),
        ({"cfg": [16] * 9}, r"needs cfg of 10 non-negative ints"),
        ({"cfg": TINY_CFG[:-1] + [-1]}, r"non-negative"),
        ({"cfg": TINY_CFG[:-1] + [0]}, r"classifier must read at least one"),
        ({"select": TINY_SELECT}, r"cfg\[0\] = 16 but block 0 reads 4 of its 16 .*pass select\[0\] with 16"),
        ({"cfg": TINY_CFG}, r"cfg\[0\] = 4 but block 0 reads 16 .*pass select\[0\] with 4 channel indices"),
        ({"cfg": TINY_CFG, "select": TINY_SELECT[:3]}, r"select needs 4 entries"),
        ({"cfg": TINY_CFG, "select": [[0, 3, 5, 16]] + TINY_SELECT[1:]}, r"select\[0\] .*\[0, 16\)"),
        ({"cfg": TINY_CFG, "select": [[0, 5, 3, 15]] + TINY_SELECT[1:]}, r"strictly increasing"),
        ({"cfg": TINY_CFG[:-1] + [3], "select": TINY_SELECT}, r"cfg\[9\] = 3 but the classifier reads"),
    ],
)
def test_bad_slim_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("slim_preresnet", **{"depth": 11, **kwargs})


def test_bad_bearpaw_arguments() -> None:
    with pytest.raises(ValueError, match="without channel selection, so select must be None"):
        PreResNet(11, select=[None] * 4, channel_selection=False)
    cfg = [16, 8, 8, 32, 8, 8, 128, 8, 8, 256]  # block 1 would read 32 of its 64 channels
    with pytest.raises(ValueError, match="read the whole stream"):
        create_model("bearpaw_preresnet", depth=11, cfg=cfg)
    cfg[3] = 64  # only the inner widths are free
    model = create_model("bearpaw_preresnet", depth=11, cfg=cfg)
    assert architecture(model)["kwargs"]["cfg"] == cfg


def _random_keeps(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random keep vector per group, keeping at least one channel of each."""
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    for group in channel_groups(model):
        keep = torch.rand(group_size(model, group), generator=g) < 0.5
        keep[torch.randint(keep.numel(), (1,), generator=g)] = True
        keeps[group.name] = keep
    return keeps


@pytest.mark.parametrize("name", ["slim_preresnet", "bearpaw_preresnet"])
def test_channel_groups_cover_every_prunable_bn(name: str) -> None:
    model = create_model(name, depth=20)
    groups = channel_groups(model)
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    if name == "slim_preresnet":
        # Network Slimming's global threshold sees every BN, each through exactly one group
        assert sorted(g.bn for g in groups) == sorted(bns)
        assert len(groups) == len(model.arch_kwargs()["cfg"])  # one group per cfg entry
    else:
        assert {g.bn for g in groups} == {n for n in bns if n.endswith(("bn2", "bn3"))}
    # conv3 and the downsample convs meet the residual addition: never producers of a group
    producers = {p for g in groups for p in g.producers}
    assert not any(p.endswith(("conv3", "downsample")) for p in producers)


def test_surgery_equals_masks_and_round_trips() -> None:
    model = _randomize(create_model("slim_preresnet", depth=11, num_classes=5))
    keeps = _random_keeps(model)
    masked = copy.deepcopy(model)
    apply_masks(masked, merge(*(group_masks(masked, g, keeps[g.name]) for g in channel_groups(masked))))
    pruned = copy.deepcopy(model)
    prune_groups(pruned, keeps)
    assert count_flops(pruned).macs < count_flops(model).macs
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pruned(x), masked(x))
    arch = architecture(pruned)
    assert arch["kwargs"]["select"][0] == keeps["layer1.0.select"].nonzero().flatten().tolist()
    first = ("layer1.0.select", "layer1.0.conv1", "layer1.0.conv2")
    assert arch["kwargs"]["cfg"][:3] == [int(keeps[k].sum()) for k in first]
    rebuilt = create_model(arch["name"], **arch["kwargs"]).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt(x), pruned(x))


def test_surgery_removing_a_branch_round_trips() -> None:
    model = _randomize(create_model("slim_preresnet", depth=20))
    keeps = {"layer2.1.conv2": torch.zeros(32, dtype=torch.bool)}
    masked = copy.deepcopy(model)
    group = next(g for g in channel_groups(masked) if g.name in keeps)
    apply_masks(masked, group_masks(masked, group, keeps[group.name]))
    prune_groups(model, keeps)
    assert model.layer2[1].conv1 is None and model.layer2[1].select is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), masked(x))
    arch = architecture(model)["kwargs"]
    assert arch["cfg"][9:12] == [0, 0, 0] and arch["select"][3] == []
    rebuilt = create_model("slim_preresnet", **arch).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))
    assert "layer2.1.select" not in {g.name for g in channel_groups(rebuilt)}
