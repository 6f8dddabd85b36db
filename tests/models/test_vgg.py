"""VGG family (lit_prune/models/vgg.py): paper FLOPs, shapes, architecture round-trip, init, torchvision."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torchvision
from torch import nn

from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.surgery import prune_groups
from lit_prune.models import architecture, create_model, list_models, register_model, register_width_config
from lit_prune.models.vgg import CifarVGG, ImageNetVGG

CIFAR_L1 = ["cifar_vgg11", "cifar_vgg13", "cifar_vgg16", "cifar_vgg19"]
CIFAR_SLIM = ["slim_vgg11", "slim_vgg13", "slim_vgg16", "slim_vgg19"]
BEARPAW = ["bearpaw_vgg16_bn", "bearpaw_vgg19_bn"]
IMAGENET = ["slim_vgg11_bn", "vgg16", "vgg16_bn", "vgg16_gap"]
ALL_VGG = CIFAR_L1 + CIFAR_SLIM + BEARPAW + IMAGENET


def _meta(name: str, **kwargs) -> nn.Module:
    """Full-size model without allocating weights (shapes and MACs only)."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _scaled(name: str, divisor: int = 8) -> dict:
    """Constructor kwargs of ``name`` with every width (convs and hidden FCs) divided by ``divisor``."""
    kwargs = architecture(_meta(name))["kwargs"]
    kwargs["cfg"] = [v if v == "M" else max(1, v // divisor) for v in kwargs["cfg"]]
    if "fc_widths" in kwargs:
        kwargs["fc_widths"] = [max(1, v // divisor) for v in kwargs["fc_widths"]]
    return kwargs


def _rebuild(arch: dict) -> nn.Module:
    return create_model(arch["name"], **arch["kwargs"])


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _forward_backward(model: nn.Module, num_classes: int, batch: int = 2) -> None:
    x = torch.randn(batch, *model.input_size)
    out = model(x)
    assert out.shape == (batch, num_classes)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def test_every_vgg_is_registered() -> None:
    assert sorted(n for n in list_models() if "vgg" in n) == sorted(ALL_VGG)


# ------------------------------------------------------------------------------------------- FLOPs


def test_cifar_vgg16_flops_match_paper() -> None:
    # docs/paper-settings.md §1.3 / design.md: CIFAR VGG-16 = 3.13e8 MACs, VGG-16-A = 2.06e8, Scratch-B r = 1.519
    dense = count_flops(create_model("cifar_vgg16")).macs
    pruned = count_flops(create_model("cifar_vgg16", cfg="A")).macs
    assert dense == pytest.approx(3.13e8, rel=0.01)
    assert pruned == pytest.approx(2.06e8, rel=0.01)
    assert dense / pruned == pytest.approx(1.519, rel=0.01)


@pytest.mark.parametrize(
    ("name", "cfg", "ratio"),
    [
        ("vgg16", "thinet_conv", 3.23),
        ("vgg16_gap", "thinet_gap", 3.31),
        ("vgg16_gap", "thinet_tiny", 15.4),
        ("vgg16", "5x", 4.40),
    ],
)
def test_imagenet_vgg16_flops_ratios_match_paper(name: str, cfg: str, ratio: float) -> None:
    # docs/paper-settings.md §1.3: FLOPs(VGG-16) / FLOPs(pruned) for ThiNet and regression pruning
    dense = count_flops(_meta("vgg16")).macs
    assert dense / count_flops(_meta(name, cfg=cfg)).macs == pytest.approx(ratio, rel=0.01)


@pytest.mark.parametrize(("cfg", "params"), [("thinet_gap", 8.32e6), ("thinet_tiny", 1.32e6)])
def test_thinet_gap_params_match_release(cfg: str, params: float) -> None:
    # ThiNet README (docs/paper-settings.md §4.2): VGG-GAP 8.32M params, VGG-Tiny 1.32M
    assert count_flops(_meta("vgg16_gap", cfg=cfg)).params == pytest.approx(params, rel=0.01)


def test_official_vgg16_sizes() -> None:
    report = count_flops(_meta("vgg16"))
    assert report.params == 138_357_544  # torchvision's VGG-16
    assert report.macs == pytest.approx(15.47e9, rel=0.01)
    assert _meta("vgg16").input_size == (3, 224, 224)


# ------------------------------------------------------------------------------ build, forward, backward


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_VGG)
def test_full_width_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    _forward_backward(model, 1000 if name in IMAGENET else 10)


@pytest.mark.parametrize("name", ALL_VGG)
def test_defaults(name: str) -> None:
    model = _meta(name)
    if name in IMAGENET:
        assert model.input_size == (3, 224, 224)
        assert model.classifier[-1].out_features == 1000
    else:
        assert model.input_size == (3, 32, 32)
        assert model.classifier[-1].out_features == 10


def test_default_cfgs() -> None:
    m = "M"
    assert architecture(_meta("cifar_vgg16"))["kwargs"]["cfg"] == [
        64, 64, m, 128, 128, m, 256, 256, 256, m, 512, 512, 512, m, 512, 512, 512
    ]  # fmt: skip
    assert architecture(_meta("slim_vgg19"))["kwargs"]["cfg"] == [
        64, 64, m, 128, 128, m, 256, 256, 256, 256, m, 512, 512, 512, 512, m, 512, 512, 512, 512
    ]  # fmt: skip
    assert architecture(_meta("slim_vgg11_bn"))["kwargs"]["cfg"] == [
        64, m, 128, m, 256, 256, m, 512, 512, m, 512, 512, m, 4096, 4096
    ]  # fmt: skip
    convs = [sum(isinstance(x, nn.Conv2d) for x in _meta(n).modules()) for n in CIFAR_L1]
    assert convs == [8, 10, 13, 16]


def test_heads_follow_the_reference() -> None:
    l1, slim, bp = _meta("cifar_vgg16"), _meta("slim_vgg16"), _meta("bearpaw_vgg16_bn")
    assert [type(x) for x in l1.classifier] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (l1.classifier[0].in_features, l1.classifier[0].out_features) == (512, 512)
    assert [type(x) for x in slim.classifier] == [nn.Linear] == [type(x) for x in bp.classifier]
    assert bp.classifier[0].in_features == 512
    sb = _meta("slim_vgg11_bn")
    assert [type(x) for x in sb.classifier] == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear
    ]  # fmt: skip
    assert sb.classifier[0].in_features == 512 * 7 * 7
    # no ReLU works in place: hooks on a conv or BN must see that layer's own output
    for name in ALL_VGG:
        assert not any(getattr(x, "inplace", False) for x in _meta(name).modules()), name


# ---------------------------------------------------------------------------- architecture round-trip

_ODD16 = [3, 5, "M", 7, 2, "M", 9, 4, 6, "M", 3, 5, 7, "M", 2, 4, 6]  # 13 nonstandard widths, 4 pools


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cifar_vgg16", {"cfg": [5, 7, "M", 9, 3, "M", 11, 4, 6, "M", 13, 2, 8, "M", 10, 12, 14]}),
        ("slim_vgg11", {"cfg": [3, "M", 5, "M", 7, 2, "M", 9, 4, "M", 6, 11], "num_classes": 100}),
        ("bearpaw_vgg19_bn", {"cfg": [3, 4, "M", 5, 6, "M", 7, 8, 9, 2, "M", 3, 4, 5, 6, "M", 7, 8, 9, 10]}),
        ("slim_vgg11_bn", {"cfg": [3, "M", 5, "M", 7, 2, "M", 9, 4, "M", 6, 11, "M", 13, 17]}),
        ("vgg16", {"cfg": [*_ODD16, "M"], "fc_widths": [9, 4]}),
        ("vgg16_bn", {"cfg": [*_ODD16, "M"], "fc_widths": [5, 6], "num_classes": 3}),
        ("vgg16_gap", {"cfg": _ODD16}),
    ],
)
def test_architecture_round_trip(name: str, kwargs: dict) -> None:
    model = create_model(name, **kwargs)
    arch = json.loads(json.dumps(architecture(model)))  # plain data, YAML/JSON-writable
    assert arch["name"] == name
    assert arch["kwargs"]["cfg"] == kwargs["cfg"]
    assert _shapes(_rebuild(arch)) == _shapes(model)


def _slice_conv_out(model: nn.Module, conv_index: int, keep: int) -> None:
    """Physically keep the first ``keep`` output channels of features[conv_index] (and its BN, next conv)."""
    feats = model.features
    conv = feats[conv_index]
    idx = torch.arange(keep)
    new = nn.Conv2d(conv.in_channels, keep, 3, padding=1, bias=conv.bias is not None)
    new.weight.data = conv.weight.data[idx].clone()
    feats[conv_index] = new
    if isinstance(feats[conv_index + 1], nn.BatchNorm2d):
        bn = nn.BatchNorm2d(keep)
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).data = getattr(feats[conv_index + 1], k).data[idx].clone()
        feats[conv_index + 1] = bn
    nxt = next(i for i in range(conv_index + 1, len(feats)) if isinstance(feats[i], nn.Conv2d))
    old = feats[nxt]
    cut = nn.Conv2d(keep, old.out_channels, 3, padding=1, bias=old.bias is not None)
    cut.weight.data = old.weight.data[:, idx].clone()
    feats[nxt] = cut


def test_architecture_reads_sliced_shapes() -> None:
    model = create_model("cifar_vgg16", cfg=_scaled("cifar_vgg16")["cfg"])
    _slice_conv_out(model, 3, 5)  # second conv: 8 -> 5 channels
    assert architecture(model)["kwargs"]["cfg"][:2] == [8, 5]
    assert _shapes(_rebuild(architecture(model))) == _shapes(model)

    slim = create_model("slim_vgg11_bn", **_scaled("slim_vgg11_bn"))
    # slice the first hidden FC layer 512 -> 100 units (Linear out, BN1d, next Linear in)
    slim.classifier[0] = nn.Linear(slim.classifier[0].in_features, 100)
    slim.classifier[1] = nn.BatchNorm1d(100)
    slim.classifier[3] = nn.Linear(100, slim.classifier[3].out_features)
    arch = architecture(slim)
    assert arch["kwargs"]["cfg"][-2:] == [100, 512]
    assert _shapes(_rebuild(arch)) == _shapes(slim)


@pytest.mark.parametrize("name", ALL_VGG)
def test_channel_groups_surgery_keeps_outputs_and_architecture(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **_scaled(name, 16)).eval()
    for bn in _bns(model):  # non-trivial running stats, so that BN slicing is exercised
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    groups = channel_groups(model)
    n_convs = len(_convs(model))
    assert len(groups) == n_convs + (2 if name == "slim_vgg11_bn" else 0)
    assert all(g.bn is not None for g in groups) == (name not in ("vgg16", "vgg16_gap"))
    keeps = {g.name: torch.rand(group_size(model, g)) < 0.6 for g in groups}
    for keep in keeps.values():
        keep[0] = True  # a plain chain may not lose all its channels
    # reference: the same model with the removed channels silenced (their conv/linear rows and BN zero)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for g in groups:
            for path in g.producers:
                for p in masked.get_submodule(path).parameters(recurse=False):
                    p[~keeps[g.name]] = 0
    prune_groups(model, keeps)
    arch = architecture(model)
    assert [v for v in arch["kwargs"]["cfg"] if v != "M"][:n_convs] == [
        int(keeps[g.name].sum()) for g in groups[:n_convs]
    ]
    rebuilt = _rebuild(arch)
    assert _shapes(rebuilt) == _shapes(model)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = torch.randn(2, *model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), masked(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ torchvision layout


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_torchvision_layout(name: str) -> None:
    ours = _meta(name)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(weights=None)
    assert _shapes(ours) == _shapes(theirs)
    assert {n: type(m) for n, m in ours.named_modules() if n} == {
        n: type(m) for n, m in theirs.named_modules() if n
    }
    ours.load_state_dict(theirs.state_dict(), assign=True)  # strict: same keys, same shapes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_torchvision_state_dict_loads_and_matches(name: str) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


# ----------------------------------------------------------------------------------------- init schemes


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(
    ("name", "gamma", "conv_bias"),
    [(n, 0.5, False) for n in CIFAR_L1 + CIFAR_SLIM]
    + [(n, 1.0, True) for n in BEARPAW]
    + [("slim_vgg11_bn", 0.5, True), ("vgg16_bn", 1.0, True)]
    + [("vgg16", None, True), ("vgg16_gap", None, True)],
)
def test_bn_and_bias_init(name: str, gamma: float | None, conv_bias: bool) -> None:
    model = create_model(name, **_scaled(name))
    bns = _bns(model)
    if gamma is None:
        assert not bns
    else:
        assert bns
        for bn in bns:
            assert torch.all(bn.weight == gamma) and torch.all(bn.bias == 0)
    for conv in _convs(model):
        assert (conv.bias is not None) == conv_bias
        if conv.bias is not None:
            assert torch.all(conv.bias == 0)
    if name == "cifar_vgg16":  # the L1 head has a BN1d with gamma 0.5 too
        assert isinstance(model.classifier[1], nn.BatchNorm1d)
        assert torch.all(model.classifier[1].weight == 0.5)


def _relative_std_error(w: torch.Tensor, expected: float) -> float:
    return abs(w.std().item() / expected - 1.0)


@pytest.mark.parametrize(
    ("name", "fan"), [("cifar_vgg11", "out"), ("slim_vgg11", "out"), ("bearpaw_vgg16_bn", "in")]
)
def test_conv_init_fan(name: str, fan: str) -> None:
    torch.manual_seed(0)
    # a conv with 16 inputs and 256 outputs: fan-in and fan-out stds differ by a factor 4
    n_convs = sum(1 for v in architecture(_meta(name))["kwargs"]["cfg"] if v != "M")
    model = create_model(name, cfg=[16, 256, "M", "M", "M", "M"] + [8] * (n_convs - 2))
    conv = _convs(model)[1]
    assert (conv.in_channels, conv.out_channels) == (16, 256)
    k = 9 * (conv.out_channels if fan == "out" else conv.in_channels)
    assert _relative_std_error(conv.weight, math.sqrt(2.0 / k)) < 0.05


@pytest.mark.parametrize("name", ["cifar_vgg16", "slim_vgg16", "bearpaw_vgg16_bn", "slim_vgg11_bn", "vgg16"])
def test_linear_init(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **_scaled(name, 4))
    for lin in (m for m in model.modules() if isinstance(m, nn.Linear)):
        assert torch.all(lin.bias == 0)
        if lin.weight.numel() >= 2000:
            assert _relative_std_error(lin.weight, 0.01) < 0.1


def test_imagenet_conv_init_is_fan_out() -> None:
    torch.manual_seed(0)
    cfg = [16, 256, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M"]
    model = create_model("vgg16", cfg=cfg, fc_widths=[8, 8])
    conv = model.features[2]
    assert (conv.in_channels, conv.out_channels) == (16, 256)
    assert _relative_std_error(conv.weight, math.sqrt(2.0 / (9 * 256))) < 0.05


def test_reset_parameters_restores_scheme() -> None:
    model = create_model("slim_vgg16", **_scaled("slim_vgg16"))
    for bn in _bns(model):
        nn.init.constant_(bn.weight, 3.0)
    model.reset_parameters()
    assert all(torch.all(bn.weight == 0.5) for bn in _bns(model))


# ------------------------------------------------------------------------------------------- validation


_V11 = [8, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8]  # a valid 11-layer CIFAR cfg, 4 pools
_V16 = [8, 8, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M"]  # a valid ImageNet VGG-16 cfg


def _with(cfg: list, i: int, v: object) -> list:
    cfg = list(cfg)
    cfg[i] = v
    return cfg


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("cifar_vgg16", {"cfg": []}, "non-empty list"),
        ("cifar_vgg16", {"cfg": 64}, "non-empty list"),
        ("cifar_vgg11", {"cfg": _with(_V11, 1, "X")}, r"cfg\[1\] = 'X' is neither"),
        ("cifar_vgg11", {"cfg": _with(_V11, 2, 0)}, r"cfg\[2\] = 0 is not a positive conv width"),
        ("cifar_vgg11", {"cfg": _with(_V11, 2, -3)}, "not a positive conv width"),
        ("cifar_vgg11", {"cfg": _with(_V11, 2, 12.5)}, "neither"),
        ("cifar_vgg11", {"cfg": _with(_V11, 0, True)}, "neither"),
        ("cifar_vgg11", {"cfg": _V11[:-1]}, "exactly 8 conv widths"),
        ("cifar_vgg11", {"cfg": [*_V11, "M"]}, "4 'M' pools"),
        ("slim_vgg11", {"cfg": [v for v in _V11 if v != "M"]}, "4 'M' pools"),
        ("bearpaw_vgg16_bn", {"cfg": [8] * 13}, "4 'M' pools"),
        ("slim_vgg11_bn", {"cfg": [*_V11, "M"]}, "two hidden FC widths"),
        ("slim_vgg11_bn", {"cfg": [*_V11, "M", 0, 9]}, "two hidden FC widths"),
        ("vgg16", {"fc_widths": [4096]}, "fc_widths"),
        ("vgg16", {"fc_widths": [4096, 0]}, "fc_widths"),
        ("vgg16", {"cfg": _V16, "dropout": 1.5}, "dropout"),
        ("vgg16", {"cfg": _V16[:-4]}, "exactly 13 conv widths"),
        ("cifar_vgg16", {"num_classes": 0}, "num_classes"),
        ("vgg16_bn", {"num_classes": "ten"}, "num_classes"),
    ],
)
def test_bad_arguments_raise(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_string_cfg_is_not_a_width_list() -> None:
    # through create_model a string names a registered width config; the class itself refuses it
    with pytest.raises(ValueError, match="non-empty list"):
        CifarVGG(16, cfg="M")
    with pytest.raises(ValueError, match="style must be one of"):
        CifarVGG(16, style="other")
    with pytest.raises(ValueError, match="depth must be one of"):
        CifarVGG(15)
    with pytest.raises(ValueError, match="fc_widths must be None"):
        ImageNetVGG(13, cfg=_V16, default_cfg=_V16, batch_norm=False, head="gap", fc_widths=[8, 8])
    with pytest.raises(ValueError, match="head must be"):
        ImageNetVGG(13, cfg=_V16, default_cfg=_V16, batch_norm=False, head="mlp")


def test_duplicate_registration_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("cifar_vgg16")(lambda cfg=None, num_classes=10: None)
    with pytest.raises(ValueError, match="already registered"):
        register_width_config("cifar_vgg16", "A", [1])
    with pytest.raises(KeyError, match="no width config named 'Z'"):
        create_model("cifar_vgg16", cfg="Z")
