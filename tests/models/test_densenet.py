"""DenseNet family: shapes, init, sizes, channel selections, width configs, argument validation."""

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
from lit_prune.models.densenet import DenseNet

# depth 7 = 3 * 1 + 4, growth 4: stem 8; layer reads 8 (-> 12); transition reads 12; layer reads 12 (-> 16);
# transition reads 16; layer reads 16 (-> 20); the classifier reads 20. Six selection points.
TINY = {
    "slim_densenet": {"depth": 7, "growth": 4},
    "densenet": {"depth": 10, "growth": 4, "bottleneck": True, "compression": 0.5},
}
FULL = ["slim_densenet40", "densenet40", "densenet_c100", "densenet_bc100"]
STREAMS = [8, 12, 12, 16, 16, 20]
TINY_SELECT = [[0, 7], [1, 2, 3, 11], list(range(12)), [0, 15], [2, 3, 5, 8, 13], [4, 19]]
TINY_CFG = [2, 4, 12, 2, 5, 2]


def _tiny_slim(**kwargs) -> DenseNet:
    return create_model("slim_densenet", depth=7, growth=4, **kwargs)


def _randomize(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running stats, so that equivalence tests see every channel."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g)
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model.eval()


def _consumers(model: DenseNet) -> list[nn.Module]:
    """The layer reading each selection point: every dense layer's and transition's conv1, then the fc."""
    return [r.conv1 for r in model.readers()] + [model.fc]


def test_every_registered_model_is_tested() -> None:
    assert set(list_models("*densenet*")) == set(TINY) | set(FULL)


def test_slim_densenet40_default_cfg_is_the_papers() -> None:
    model = create_model("slim_densenet40")
    cfg = model.arch_kwargs()["cfg"]
    block = [list(range(start, start + 12 * 12, 12)) for start in (24, 168, 312)]
    assert len(cfg) == 39
    assert cfg == block[0] + [168] + block[1] + [312] + block[2] + [456]
    assert len(model.selections()) == 39 and all(isinstance(s, ChannelSelection) for s in model.selections())
    assert (model.trans1.conv1.out_channels, model.trans2.conv1.out_channels) == (168, 312)  # compression 1
    assert all(layer.conv1.kernel_size == (3, 3) and layer.conv1.out_channels == 12 for layer in model.dense1)


def test_densenet40_is_slim_densenet40_without_selection() -> None:
    slim, plain = create_model("slim_densenet40"), create_model("densenet40")
    assert plain.arch_kwargs() == {"cfg": slim.arch_kwargs()["cfg"]}
    assert not any(isinstance(m, ChannelSelection) for m in plain.modules())
    slim_shapes = {k: v.shape for k, v in slim.state_dict().items() if not k.endswith("indices")}
    assert {k: v.shape for k, v in plain.state_dict().items()} == slim_shapes


def test_densenet_c100_is_the_reference_codes_densenet_c() -> None:
    model = create_model("densenet_c100")
    # 32 basic (3x3 only) layers per block, compression 0.5: 24 -> 408 | 204 -> 588 | 294 -> 678
    assert [len(b) for b in (model.dense1, model.dense2, model.dense3)] == [32, 32, 32]
    assert not any(layer.bottleneck for layer in model.dense1)
    assert (model.trans1.conv1.in_channels, model.trans1.conv1.out_channels) == (408, 204)
    assert (model.trans2.conv1.in_channels, model.trans2.conv1.out_channels) == (588, 294)
    assert model.fc.in_features == 678


def test_densenet_bc100_is_a_true_densenet_bc() -> None:
    model = create_model("densenet_bc100")
    # 16 bottleneck layers per block (1x1 to 48, 3x3 to 12), compression 0.5:
    # 24 -> 216 | 108 -> 300 | 150 -> 342
    assert [len(b) for b in (model.dense1, model.dense2, model.dense3)] == [16, 16, 16]
    layer = model.dense2[0]
    assert (layer.conv1.kernel_size, layer.conv1.in_channels, layer.conv1.out_channels) == ((1, 1), 108, 48)
    assert (layer.conv2.kernel_size, layer.conv2.out_channels) == ((3, 3), 12)
    assert (model.trans1.conv1.in_channels, model.trans1.conv1.out_channels) == (216, 108)
    assert (model.trans2.conv1.in_channels, model.trans2.conv1.out_channels) == (300, 150)
    assert model.fc.in_features == 342
    cfg = model.arch_kwargs()["cfg"]
    assert len(cfg) == 3 * 16 * 2 + 3 and cfg[:4] == [24, 48, 36, 48]


def test_sizes() -> None:
    params = {n: sum(p.numel() for p in create_model(n, num_classes=10).parameters()) for n in FULL}
    # DenseNet-40: convs 1,036,008 + BN 18,720 + fc 4,570. Network Slimming's Table 1 says 1.02M because the
    # original (Lua) DenseNet-40 has a 16-channel stem (-> 1,019,722); the PyTorch reference code, which
    # the paper ran, uses 2 * growth = 24 (docs/paper-settings.md §2.5).
    assert params["slim_densenet40"] == params["densenet40"] == 1_059_298
    assert 0.75e6 < params["densenet_bc100"] < 0.82e6  # DenseNet paper: 0.8M
    assert params["densenet_c100"] == pytest.approx(4.07e6, rel=0.01)
    report = count_flops(create_model("slim_densenet40"))
    assert report.params == params["slim_densenet40"]  # the selection indices are buffers
    assert report.macs == pytest.approx(2.829e8, rel=0.001)


@pytest.mark.parametrize("name, gamma", [("slim_densenet", 0.5), ("densenet", 1.0)])
def test_init_scheme(name: str, gamma: float) -> None:
    model = create_model(name, depth=10, growth=16)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == gamma) and torch.all(m.bias == 0) for m in bns)
    conv = model.dense3[1].conv1  # 3x3 -> 16 channels: He fan-out std = sqrt(2 / (9 * 16))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.05)


def test_selection_shrinks_what_the_convs_read() -> None:
    model = _tiny_slim(cfg=TINY_CFG, select=TINY_SELECT)
    assert [c.weight.shape[1] for c in _consumers(model)] == TINY_CFG
    # conv outputs and the concatenated stream keep their widths
    assert [r.conv1.out_channels for r in model.readers()] == [4, 12, 4, 16, 4]
    assert [r.bn1.num_features for r in model.readers()] + [model.bn.num_features] == STREAMS
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_selection_indices_are_buffers_in_the_state_dict() -> None:
    model = _tiny_slim(cfg=TINY_CFG, select=TINY_SELECT)
    assert not any("indices" in name for name, _ in model.named_parameters())
    sd = model.state_dict()
    assert sd["dense1.0.select.indices"].tolist() == TINY_SELECT[0]
    assert sd["trans1.select.indices"].tolist() == TINY_SELECT[1]
    assert sd["select.indices"].tolist() == TINY_SELECT[5]


def test_architecture_round_trip() -> None:
    model = _randomize(_tiny_slim(num_classes=5, cfg=TINY_CFG, select=TINY_SELECT))
    arch = architecture(model)
    assert arch["kwargs"]["cfg"] == TINY_CFG
    # an all-channel selection is written compactly as None
    assert arch["kwargs"]["select"] == TINY_SELECT[:2] + [None] + TINY_SELECT[3:]
    rebuilt = create_model(arch["name"], **arch["kwargs"]).eval()
    sd, rsd = model.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in rsd.items()}
    assert all(torch.equal(sd[k], rsd[k]) for k in sd if k.endswith("indices"))
    rebuilt.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_bottleneck_width_is_prunable_and_round_trips() -> None:
    kwargs = dict(TINY["densenet"])
    cfg = create_model("densenet", **kwargs).arch_kwargs()["cfg"]
    # bottleneck layers give [reads, bottleneck width]; compression 0.5: 8 -> 12 | 6 -> 10 | 5 -> 9
    assert cfg == [8, 16, 12, 6, 16, 10, 5, 16, 9]
    cfg[1], cfg[7] = 3, 1
    model = create_model("densenet", cfg=cfg, **kwargs)
    layer = model.dense1[0]
    assert (layer.conv1.out_channels, layer.bn2.num_features, layer.conv2.in_channels) == (3, 3, 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    arch = architecture(model)
    assert arch["kwargs"]["cfg"] == cfg and "select" not in arch["kwargs"]
    rebuilt = create_model(arch["name"], **arch["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_select_all_equals_no_selection() -> None:
    plain = _randomize(_tiny_slim())
    explicit = _tiny_slim(select=[list(range(c)) for c in STREAMS]).eval()
    explicit.load_state_dict(plain.state_dict())
    bearpaw = create_model("densenet", depth=7, growth=4).eval()
    bearpaw.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.endswith("indices")})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(explicit(x), plain(x))
    torch.testing.assert_close(bearpaw(x), plain(x))


def test_selection_reads_the_selected_channels() -> None:
    """A selecting model equals the full model whose readers have zero weights on unselected channels."""
    pruned = _randomize(_tiny_slim(cfg=TINY_CFG, select=TINY_SELECT))
    full = _tiny_slim().eval()
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    state = {k: v for k, v in pruned.state_dict().items() if shapes.get(k) == v.shape}
    full.load_state_dict(state, strict=False)  # every tensor but the readers' weights
    with torch.no_grad():
        for src, dst, idx in zip(_consumers(pruned), _consumers(full), TINY_SELECT, strict=True):
            dst.weight.zero_()
            dst.weight[:, idx] = src.weight
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(full(x), pruned(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 8}, r"3n\+4"),
        ({"depth": 7, "bottleneck": True}, r"6n\+4"),
        ({"compression": 0.0}, r"compression"),
        ({"cfg": STREAMS[:-1]}, r"needs cfg of 6 positive ints"),
        ({"cfg": TINY_CFG[:-1] + [0], "select": TINY_SELECT}, r"Zero widths are refused"),
        ({"select": TINY_SELECT}, r"cfg\[0\] = 8 but position 0 reads 2 of its 8 .*pass select\[0\] with 8"),
        ({"cfg": TINY_CFG}, r"cfg\[0\] = 2 but position 0 reads 8 .*pass select\[0\] with 2 channel indices"),
        ({"cfg": TINY_CFG, "select": TINY_SELECT[1:]}, r"select needs 6 entries"),
        ({"cfg": TINY_CFG, "select": [[0, 8]] + TINY_SELECT[1:]}, r"select\[0\] .*\[0, 8\)"),
        ({"cfg": TINY_CFG, "select": [[3, 3]] + TINY_SELECT[1:]}, r"strictly increasing"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"depth": 7, "growth": 4, "channel_selection": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        DenseNet(**args)


def test_bad_bearpaw_arguments() -> None:
    with pytest.raises(ValueError, match="without channel selection, so select must be None"):
        DenseNet(7, growth=4, select=[None] * 6, channel_selection=False)
    with pytest.raises(ValueError, match="read the whole stream"):
        create_model("densenet", depth=7, growth=4, cfg=TINY_CFG)


def _random_keeps(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random keep vector per group, keeping at least one channel of each."""
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    for group in channel_groups(model):
        keep = torch.rand(group_size(model, group), generator=g) < 0.5
        keep[torch.randint(keep.numel(), (1,), generator=g)] = True
        keeps[group.name] = keep
    return keeps


def test_channel_groups() -> None:
    slim = create_model("slim_densenet40")
    groups = channel_groups(slim)
    # Network Slimming's threshold sees every BN, one group each, all of them selections: no conv output
    # of a DenseNet is ever cut (docs/paper-settings.md §6.2)
    bns = [n for n, m in slim.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(g.bn for g in groups) == sorted(bns)
    assert len(groups) == 39 and all(g.selection is not None and not g.producers for g in groups)
    assert channel_groups(create_model("densenet40")) == []  # nothing prunable without selections
    bc = channel_groups(create_model("densenet_bc100"))
    assert len(bc) == 48 and all(g.producers == (g.conv, g.bn) and g.bn.endswith("bn2") for g in bc)


@pytest.mark.parametrize("name", sorted(TINY))
def test_surgery_equals_masks_and_round_trips(name: str) -> None:
    kwargs = TINY[name]
    if name == "densenet":
        kwargs = {**kwargs, "depth": 16}  # two bottleneck layers per block
    model = _randomize(create_model(name, num_classes=5, **kwargs))
    keeps = _random_keeps(model)
    masked = copy.deepcopy(model)
    apply_masks(masked, merge(*(group_masks(masked, g, keeps[g.name]) for g in channel_groups(masked))))
    pruned = copy.deepcopy(model)
    prune_groups(pruned, keeps)
    assert count_flops(pruned).macs < count_flops(model).macs
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pruned(x), masked(x))
    arch = architecture(pruned)
    rebuilt = create_model(arch["name"], **arch["kwargs"]).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt(x), pruned(x))
    if name == "slim_densenet":
        assert arch["kwargs"]["cfg"] == [int(k.sum()) for k in keeps.values()]
        assert arch["kwargs"]["select"][-1] == keeps["select"].nonzero().flatten().tolist()


def test_a_selection_cannot_vanish() -> None:
    model = _tiny_slim()
    with pytest.raises(ValueError, match="floor"):
        prune_groups(model, {"trans1.select": torch.zeros(12, dtype=torch.bool)})
