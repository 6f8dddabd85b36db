"""Channel groups of models outside the zoo, from Torch-Pruning's dependency graph: coverage, coupling, surgery.

Small versions of each family (torchvision and timm code, random weights, reduced widths, 32x32 inputs,
grouped convs in RegNet and ResNeXt, ``nn.MultiheadAttention`` in torchvision's ViT, GroupNorm):
every conv output channel lands in a group, coupled layers go together, the physically pruned model equals
the masked dense one (BatchNorm models) or Torch-Pruning's own pruning of the same channels (LayerNorm
streams), and the groups renumbered after surgery are the groups a fresh trace finds.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch_pruning as tp
import torchvision
from timm.models.regnet import RegNet, RegNetCfg
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from lit_prune.core import groups as groups_module
from lit_prune.core.flops import count_flops
from lit_prune.core.graph import mask_exact, tp_channel_groups
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.importance import group_scores
from lit_prune.core.masks import apply_masks, group_masks, merge
from lit_prune.core.surgery import edits_of, prune_groups, replay_edits
from lit_prune.models import create_model
from tests.helpers import randomize_bn

SIZE = (3, 32, 32)


def _resnet() -> nn.Module:
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def _densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=10)


BUILDERS = {
    "resnet": _resnet,
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10),
    "densenet": _densenet,
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=10),
    "efficientnet_gn": lambda: timm.create_model("test_efficientnet_gn", num_classes=10),
    "convnext": lambda: timm.create_model("test_convnext", num_classes=10),
    "vit": lambda: timm.create_model("test_vit", num_classes=10, img_size=32),
    "regnet": lambda: RegNet(RegNetCfg(depth=4, w0=8, wa=12, wm=1.5, group_size=8, se_ratio=0.25, stem_width=8),
                             num_classes=10),
    "resnext": lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10),
    "tv_vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                        mlp_dim=32, num_classes=10),
}
#: models whose norms see several channels at once (LayerNorm, GroupNorm): masks there only approximate pruning
LAYERNORM_STREAMS = ("convnext", "vit", "tv_vit", "efficientnet_gn")


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    randomize_bn(model)  # a forgotten beta or running mean would show
    with torch.no_grad():  # ConvNeXt's layer scales start at 1e-6: its blocks would barely count
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif not p.any():  # zero-initialised biases and heads (torchvision's ViT) would hide a wrong cut
                p.uniform_(-0.5, 0.5)
    return model


def _keeps(model: nn.Module, groups, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for group in groups:
        keep = torch.rand(group_size(model, group), generator=g) < 0.6
        keep[0] = True
        out[group.name] = keep
    return out


def _covered(model: nn.Module, groups) -> set[str]:
    """Conv layers every output channel of which belongs to some group."""
    out = set()
    for g in groups:
        for m in g.members:
            if m.kind == "out" and isinstance(model.get_submodule(m.path), nn.Conv2d):
                if len(set(m.idx)) == model.get_submodule(m.path).out_channels:
                    out.add(m.path)
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_groups_cover_every_conv_and_pruned_equals_masked(name: str) -> None:
    model = _build(name)
    groups = channel_groups(model, SIZE)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert _covered(model, groups) == convs
    keeps = _keeps(model, groups)
    exact = [g for g in groups if mask_exact(model, g)]
    assert exact and (len(exact) == len(groups)) == (name not in LAYERNORM_STREAMS)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, merge(*[group_masks(masked, g, keeps[g.name]) for g in exact]))
    prune_groups(pruned, {g.name: keeps[g.name] for g in exact}, groups)
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, out_masked, out_pruned = model(x), masked(x), pruned(x)
    torch.testing.assert_close(out_pruned, out_masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full, out_masked, atol=1e-3)  # the pruning changed the function
    shrink = 0.8 if len(exact) == len(groups) else 1.0  # only the MLPs, SE gates of such a model are exact
    assert sum(p.numel() for p in pruned.parameters()) < shrink * sum(p.numel() for p in model.parameters())
    # trace once: the renumbered groups of the pruned model are what a fresh trace of it finds
    assert channel_groups(pruned) == tp_channel_groups(pruned, SIZE)
    for g in channel_groups(pruned):
        if g.name in keeps and g in exact or g.name in {e.name for e in exact}:
            assert group_size(pruned, g) == int(keeps[g.name].sum())


@pytest.mark.parametrize("name", LAYERNORM_STREAMS)
def test_layernorm_streams_are_pruned_as_torch_pruning_prunes_them(name: str) -> None:
    model = _build(name)
    groups = [g for g in channel_groups(model, SIZE) if not mask_exact(model, g)]
    assert groups and all(g.bn is not None for g in groups)  # the stream's LayerNorm is the group's norm
    keeps = _keeps(model, groups, seed=3)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    prune_groups(ours, keeps, groups)
    dg = tp.DependencyGraph().build_dependency(theirs, torch.zeros(1, *SIZE), verbose=False)
    for g in groups:
        own = g.members[0]  # the root's rows (several per channel where heads tie them)
        root = theirs.get_submodule(own.path)
        gone = [i for i, r in zip(own.idx, own.roots) if not keeps[g.name][r]]
        fn = dg.get_pruner_of_module(root).prune_out_channels
        dg.get_pruning_group(root, fn, gone).prune()
    if hasattr(theirs, "hidden_dim"):  # torchvision's ViT reshapes by it; Torch-Pruning leaves it to its user
        theirs.hidden_dim = ours.hidden_dim
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # bit-identical


def test_a_residual_stream_is_one_group_and_a_depthwise_conv_goes_with_its_producer() -> None:
    resnet = _build("resnet")
    stream = next(g for g in channel_groups(resnet, SIZE) if "conv1" in g.producers)
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2"} <= set(stream.producers)
    assert {"layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(stream.consumers)
    mb = _build("mobilenet_v2")
    expand = next(g for g in channel_groups(mb, SIZE) if "features.2.conv.0.0" in g.producers)
    assert {"features.2.conv.0.1", "features.2.conv.1.0", "features.2.conv.1.1"} <= set(expand.producers)
    assert expand.consumers == ("features.2.conv.2",)
    pruned = copy.deepcopy(mb)
    keep = torch.arange(group_size(mb, expand)) % 3 != 0
    prune_groups(pruned, {expand.name: keep})
    dw = pruned.features[2].conv[1][0]
    assert dw.in_channels == dw.out_channels == dw.groups == int(keep.sum())
    torch.testing.assert_close(dw.weight, mb.features[2].conv[1][0].weight[keep])


def test_a_concatenation_maps_a_producer_to_its_offsets_in_every_reader() -> None:
    model = _build("densenet")
    g = next(g for g in channel_groups(model, SIZE) if g.name == "features.denseblock1.denselayer1.conv2")
    reader = next(m for m in g.members if m.path == "features.denseblock1.denselayer2.conv1")
    assert reader.kind == "in" and reader.idx == (8, 9, 10, 11)  # after the 8 stem channels
    keep = torch.tensor([True, False, True, False])
    pruned = copy.deepcopy(model)
    prune_groups(pruned, {g.name: keep})
    cols = [i for i in range(12) if i not in (9, 11)]
    torch.testing.assert_close(pruned.features.denseblock1.denselayer2.conv1.weight,
                               model.features.denseblock1.denselayer2.conv1.weight[:, cols])


def test_vit_heads_are_pruned_with_consistent_attributes() -> None:
    model = _build("vit")
    attn = model.blocks[0].attn
    heads = next(g for g in channel_groups(model, SIZE) if g.name == "blocks.0.attn.heads")
    assert group_size(model, heads) == attn.num_heads and heads.attention == "blocks.0.attn"
    keep = torch.zeros(attn.num_heads, dtype=torch.bool)
    keep[1] = True
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, group_masks(masked, heads, keep))
    prune_groups(pruned, {heads.name: keep})
    a = pruned.blocks[0].attn
    assert (a.num_heads, a.attn_dim, a.qkv.out_features, a.proj.in_features) == (1, a.head_dim, 3 * a.head_dim,
                                                                                 a.head_dim)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-4)
    # the head's score sums its qkv rows
    l1 = group_scores(model, heads, "l1")
    d = attn.head_dim * attn.num_heads
    rows = attn.qkv.weight.detach().abs().sum(1).reshape(3, attn.num_heads, attn.head_dim)
    torch.testing.assert_close(l1, rows.sum((0, 2)))
    assert d == attn.attn_dim


def test_a_multihead_attention_stream_loses_the_same_dims_of_every_head() -> None:
    model = _build("tv_vit")
    attn = model.encoder.layers[0].self_attention
    stream = next(g for g in channel_groups(model, SIZE) if "conv_proj" in g.producers)
    assert group_size(model, stream) == attn.head_dim == 8  # 16 dims = 2 heads x 8, tied by position
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    kept = torch.cat([keep, keep]).nonzero().flatten()  # stream channels 1, 4, 9, 12 go
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, group_masks(masked, stream, keep))
    prune_groups(pruned, {stream.name: keep})
    a = pruned.encoder.layers[0].self_attention
    assert (a.embed_dim, a.num_heads, a.head_dim, pruned.hidden_dim) == (12, 2, 6, 12)
    rows = torch.cat([kept + s * 16 for s in range(3)])
    m = masked.encoder.layers[0].self_attention
    # the masked block's non-zero weights are exactly the pruned block's
    assert torch.equal(m.in_proj_weight[rows][:, kept], a.in_proj_weight)
    assert int(m.in_proj_weight.count_nonzero()) == a.in_proj_weight.numel()
    assert torch.equal(m.out_proj.weight[kept][:, kept], a.out_proj.weight)
    assert int(m.out_proj.weight.count_nonzero()) == a.out_proj.weight.numel()
    assert torch.equal(m.in_proj_bias[rows], a.in_proj_bias) and int(m.in_proj_bias.count_nonzero()) == 36
    # FLOPs count the block's projections once per token (16 patches + the class token)
    tokens = (SIZE[1] // 8) ** 2 + 1
    blocks = [b.self_attention for b in model.encoder.layers]
    dense = count_flops(model, SIZE)
    linears = sum(layer.weight.numel() * (tokens if layer is not model.heads.head else 1)
                  for layer in model.modules() if type(layer) is nn.Linear)
    assert dense.macs == linears + model.conv_proj.weight.numel() * 16 + sum(
        (b.in_proj_weight.numel() + b.out_proj.weight.numel()) * tokens for b in blocks)
    assert count_flops(pruned, SIZE).macs < dense.macs
    # the recorded edits (with the model's hidden_dim) rebuild the pruned model from a fresh one
    fresh = _build("tv_vit")
    replay_edits(fresh, edits_of(pruned))
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert fresh.hidden_dim == 12 and torch.equal(fresh(x), pruned(x))


def test_aggregates_score_every_coupled_layer() -> None:
    model = _build("resnet")
    stream = next(g for g in channel_groups(model, SIZE) if "conv1" in g.producers)
    convs = [p for p in stream.producers if isinstance(model.get_submodule(p), nn.Conv2d)]
    per = torch.stack([model.get_submodule(p).weight.detach().abs().flatten(1).sum(1) for p in convs])
    torch.testing.assert_close(group_scores(model, stream, "l1", "sum"), per.sum(0))
    torch.testing.assert_close(group_scores(model, stream, "l1", "mean"), per.mean(0))
    first = model.get_submodule(stream.conv).weight.detach().abs().flatten(1).sum(1)
    torch.testing.assert_close(group_scores(model, stream, "l1"), first)
    with pytest.raises(ValueError, match="unknown aggregate"):
        group_scores(model, stream, "l1", "max")


def test_tracing_changes_nothing_and_happens_once(monkeypatch) -> None:
    model = _build("resnet").train()
    model.layer1[0].bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups_module._TRACED.clear()
    calls = []
    real = tp.DependencyGraph.build_dependency
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", lambda *a, **k: calls.append(1) or real(*a, **k))
    groups = channel_groups(model, SIZE)
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    copy_ = copy.deepcopy(model)
    assert channel_groups(copy_) == groups  # same architecture: no second trace
    prune_groups(copy_, _keeps(copy_, groups))
    channel_groups(copy_)
    assert len(calls) == 1


def test_a_grouped_conv_loses_the_same_positions_of_every_slice() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, groups=2),
                        nn.ReLU(), nn.Conv2d(12, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    groups = {g.name: g for g in tp_channel_groups(net)}
    assert set(groups) == {"0", "3", "5"}  # 8 makes the logits
    # channel c of "0" is position c % 4 of the grouped conv's two input slices; "3" has 2 slices of 6 outputs
    assert group_size(net, groups["0"]) == 4 and group_size(net, groups["3"]) == 6
    feed = next(m for m in groups["0"].members if m.path == "0")
    assert feed.roots == (0, 1, 2, 3, 0, 1, 2, 3)
    keeps = {"0": torch.tensor([True, False, True, True]), "3": torch.tensor([False, True, True, True, False, True])}
    masked, pruned = copy.deepcopy(net), copy.deepcopy(net)
    apply_masks(masked, merge(*[group_masks(masked, groups[n], k) for n, k in keeps.items()]))
    prune_groups(pruned, keeps, list(groups.values()))
    conv = pruned[3]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 6, 8)
    torch.testing.assert_close(conv.weight, net[3].weight[[1, 2, 3, 5, 7, 8, 9, 11]][:, [0, 2, 3]])
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    # the L1 score of a tied channel sums its filters in every slice
    l1 = net[3].weight.detach().abs().flatten(1).sum(1)
    torch.testing.assert_close(group_scores(net, groups["3"], "l1"), l1[:6] + l1[6:])


class _TwoIntoGrouped(nn.Module):
    """Two convs concatenated into a grouped conv: each feeds one slice only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.grouped(torch.cat([self.a(x), self.b(x)], 1)))


def test_groups_reaching_the_output_or_one_slice_of_a_grouped_conv_are_refused() -> None:
    names = {g.name for g in tp_channel_groups(_TwoIntoGrouped())}
    assert names == {"grouped"}  # a and b reach one slice each; head makes the output


def test_a_forward_that_fails_names_input_size_and_zoo_declarations_win() -> None:
    class NeedsFour(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(TypeError, match="input_size"):
        channel_groups(NeedsFour())
    assert channel_groups(NeedsFour(), (4, 8, 8)) == []  # its only conv makes the output
    zoo = create_model("cifar_resnet20", cfg=[4, 4, 4, 8, 8, 8, 16, 16, 16])
    assert channel_groups(zoo) == zoo.channel_groups() and all(g.branch for g in channel_groups(zoo))
