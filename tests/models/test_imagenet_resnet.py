"""ImageNet ResNet-34/50 (torchvision layout) and bearpaw's CIFAR ResNet."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lit_prune.core.flops import count_flops
from lit_prune.models import architecture, create_model, get_width_config, list_width_configs
from lit_prune.models.imagenet_resnet import BasicBlock, BearpawResNet, Bottleneck

R34_DEFAULT = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
R50_DEFAULT = [[p, p] for p in R34_DEFAULT]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _small_r34() -> list[int]:
    return [w // 8 for w in R34_DEFAULT]


def _small_r50() -> list[list[int]]:
    return [[w1 // 8, w2 // 8 + 1] for w1, w2 in R50_DEFAULT]


@pytest.fixture(scope="module")
def dense34_macs() -> int:
    return count_flops(create_model("resnet34")).macs


@pytest.mark.parametrize("name, paper", [("A", 1.18196), ("B", 1.31541)])
def test_resnet34_pruned_flops_ratio_matches_paper(dense34_macs: int, name: str, paper: float) -> None:
    pruned = create_model("resnet34", cfg=name)
    ratio = dense34_macs / count_flops(pruned).macs
    assert ratio == pytest.approx(paper, rel=0.01)


def test_resnet34_named_configs_set_first_conv_widths() -> None:
    assert list_width_configs("resnet34") == {"resnet34": ["A", "B"]}
    model = create_model("resnet34", cfg="B")
    blocks = model.blocks()
    assert [b.conv1.out_channels for b in blocks] == get_width_config("resnet34", "B")
    # the block outputs (residual stream) and the FC input keep their width
    assert [b.conv2.out_channels for b in blocks] == R34_DEFAULT
    assert model.fc.in_features == 512


@pytest.mark.parametrize(
    "name, tv_builder", [("resnet34", torchvision.models.resnet34), ("resnet50", torchvision.models.resnet50)]
)
def test_loads_torchvision_state_dict_and_matches_outputs(name: str, tv_builder) -> None:
    torch.manual_seed(0)
    reference = tv_builder(weights=None).eval()
    model = create_model(name).eval()
    model.load_state_dict(reference.state_dict())  # strict: same keys and shapes
    # the reverse direction too: our full-width keys are exactly torchvision's
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)  # fully convolutional + global pool, so a small image suffices
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_resnet50_init_is_fan_out_and_unit_gamma() -> None:
    torch.manual_seed(0)
    model = create_model("resnet50", cfg=_small_r50())
    conv = model.layer3[0].conv3  # 1x1, out 1024: std sqrt(2/1024)
    assert conv.weight.std().item() == pytest.approx((2 / 1024) ** 0.5, rel=0.05)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name, cfg", [("resnet34", _small_r34()), ("resnet50", _small_r50())])
def test_forward_backward_at_reduced_width(name: str, cfg: list) -> None:
    model = create_model(name, cfg=cfg, num_classes=7)
    assert model.input_size == (3, 224, 224)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert [b.widths() for b in model.blocks()] == [c if isinstance(c, list) else [c] for c in cfg]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_forward_backward_full_size(name: str) -> None:
    model = create_model(name)
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_zero_width_block_is_its_shortcut() -> None:
    cfg = _small_r34()
    cfg[1] = 0  # identity-shortcut block
    cfg[3] = 0  # downsampling block: becomes its 1x1 conv + BN shortcut
    model = create_model("resnet34", cfg=cfg).eval()
    identity_block, down_block = model.layer1[1], model.layer2[0]
    assert not hasattr(identity_block, "conv1") and not hasattr(down_block, "conv2")
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(identity_block(x), torch.relu(x))
        torch.testing.assert_close(down_block(x), torch.relu(down_block.downsample(x)))
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert architecture(model)["kwargs"]["cfg"] == cfg
    assert count_flops(model).macs < count_flops(create_model("resnet34", cfg=_small_r34())).macs


def test_resnet50_zero_pair_removes_branch_and_half_zero_is_refused() -> None:
    cfg = _small_r50()
    cfg[2] = [0, 0]
    assert not create_model("resnet50", cfg=cfg).layer1[2].has_branch
    cfg[2] = [0, 4]
    with pytest.raises(ValueError, match="both 0"):
        create_model("resnet50", cfg=cfg)


def _random_select(model_name: str, cfg: list, seed: int = 0) -> list[list[int] | None]:
    g = torch.Generator().manual_seed(seed)
    widths = [b.downsample[0].in_channels if b.downsample is not None else b.conv1.in_channels
              for b in create_model(model_name, cfg=cfg).blocks()]
    select: list[list[int] | None] = []
    for i, c in enumerate(widths):
        if i == 5:
            select.append(None)  # a block that reads all its input channels
        else:
            select.append(sorted(torch.randperm(c, generator=g)[: c // 2 + 1].tolist()))
    return select


def test_architecture_round_trip_with_select_and_downsample_bias() -> None:
    cfg = _small_r50()
    select = _random_select("resnet50", cfg)
    model = create_model("resnet50", cfg=cfg, select=select, downsample_bias=True, num_classes=11)
    arch = architecture(model)
    assert arch["name"] == "resnet50"
    assert arch["kwargs"]["cfg"] == cfg and arch["kwargs"]["select"] == select
    assert arch["kwargs"]["downsample_bias"] is True and arch["kwargs"]["num_classes"] == 11
    rebuilt = create_model(arch["name"], **arch["kwargs"])
    assert _shapes(rebuilt) == _shapes(model)
    rebuilt.load_state_dict(model.state_dict())  # the selection indices travel as buffers
    assert all(b.downsample[0].bias is not None for b in model.blocks() if b.downsample is not None)
    assert model.layer1[0].conv1.in_channels == len(select[0])


def test_architecture_follows_physical_surgery() -> None:
    model = create_model("resnet34", cfg=_small_r34())
    block = model.layer3[2]
    # shrink the block's first conv to 5 filters as a structured pruner would
    block.conv1 = nn.Conv2d(block.conv1.in_channels, 5, 3, 1, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(5)
    block.conv2 = nn.Conv2d(5, block.conv2.out_channels, 3, 1, 1, bias=False)
    arch = architecture(model)
    expected = _small_r34()
    expected[7 + 2] = 5
    assert arch["kwargs"]["cfg"] == expected
    assert "select" not in arch["kwargs"] and "downsample_bias" not in arch["kwargs"]
    assert _shapes(create_model(arch["name"], **arch["kwargs"])) == _shapes(model)


def test_select_feeds_only_selected_channels_to_conv1() -> None:
    torch.manual_seed(0)
    cfg = _small_r50()
    select = _random_select("resnet50", cfg)
    selective = create_model("resnet50", cfg=cfg, select=select).eval()
    dense = create_model("resnet50", cfg=cfg).eval()
    # a dense block equals the selective one when its conv1 is zero on unselected input channels
    for b_sel, b_dense in zip(selective.blocks(), dense.blocks(), strict=True):
        state = {k: v for k, v in b_sel.state_dict().items() if not k.startswith("select.")}
        w = torch.zeros_like(b_dense.conv1.weight)
        w[:, b_sel.select.indices] = state["conv1.weight"]
        state["conv1.weight"] = w
        b_dense.load_state_dict(state)
    for name in ("conv1", "bn1", "fc"):
        getattr(dense, name).load_state_dict(getattr(selective, name).state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(selective(x), dense(x))


@pytest.mark.parametrize(
    "name, cfg, match",
    [
        ("resnet34", [64] * 15, "16 non-negative ints"),
        ("resnet34", [64] * 15 + [-1], "16 non-negative ints"),
        ("resnet50", [64] * 16, r"16 \[conv1, conv2\] width pairs"),
        ("resnet50", [[64, 64]] * 15, r"16 \[conv1, conv2\] width pairs"),
        ("resnet50", [[64, 64, 64]] * 16, r"16 \[conv1, conv2\] width pairs"),
    ],
)
def test_bad_cfg_raises_with_expected_length(name: str, cfg: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(name, cfg=cfg)


def test_bad_select_length_and_depth_raise() -> None:
    with pytest.raises(ValueError, match="16 entries"):
        create_model("resnet34", cfg=_small_r34(), select=[None] * 15)
    with pytest.raises(ValueError, match="6n\\+2"):
        BearpawResNet(49)


def test_bearpaw_resnet50_layout_and_forward_backward() -> None:
    model = create_model("bearpaw_resnet50", num_classes=10)
    assert model.input_size == (3, 32, 32)
    for layer in (model.layer1, model.layer2, model.layer3):
        assert len(layer) == 8 and all(type(b) is BasicBlock for b in layer)
    # option-B shortcut (1x1 conv + BN) exactly where the shape changes
    with_downsample = [i for i, b in enumerate(model.blocks()) if b.downsample is not None]
    assert with_downsample == [8, 16]
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].stride == (2, 2)
    assert isinstance(shortcut[1], nn.BatchNorm2d)
    assert model.fc.in_features == 64
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bearpaw_small_depth_cfg_round_trip_and_bottleneck_switch() -> None:
    model = BearpawResNet(14, cfg=[3, 16, 5, 0, 7, 9])  # n = 2 per stage
    assert [b.widths()[0] for b in model.blocks()] == [3, 16, 5, 0, 7, 9]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.arch_kwargs() == {"cfg": [3, 16, 5, 0, 7, 9]}
    with pytest.raises(ValueError, match="6 non-negative ints"):
        BearpawResNet(14, cfg=[16] * 5)
    # depth >= 54 switches to Bottlenecks with n = (depth - 2) // 6, as in the reference
    deep = BearpawResNet(56)
    assert len(deep.layer1) == 9 and isinstance(deep.layer1[0], Bottleneck)
    assert deep.layer1[0].downsample is not None and deep.fc.in_features == 256
