"""Traced channel groups: exactly the safe ones, agreeing with the zoo's declarations, usable by every method."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from callbacks import L1FilterPruning
from lit_prune.core.groups import ChannelGroup, channel_groups, group_size
from lit_prune.core.masks import apply_masks
from lit_prune.core.surgery import prune_groups
from lit_prune.core.trace import trace_channel_groups
from lit_prune.models import create_model
from lit_prune.models.base import ChannelSelection
from lit_prune.module import ImageClassifier
from tests.helpers import masks_from_keeps, randomize_bn

SIZE = (3, 64, 64)


def _key(g: ChannelGroup) -> tuple:
    return g.name, g.producers, g.consumers, g.bn, g.conv, g.selection, g.branch


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def vgg11_bn() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    # torchvision's layout, with 64 instead of 4096 hidden units: the first Linear still reads 512 * 7 * 7
    # columns, and the copies below stay small
    model.classifier[0], model.classifier[3] = nn.Linear(512 * 7 * 7, 64), nn.Linear(64, 64)
    model.classifier[6] = nn.Linear(64, 10)
    return model


def _random_keeps(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """About half of every group, at least one channel each."""
    g = torch.Generator().manual_seed(seed)
    keeps = {}
    for group in channel_groups(model):
        keep = torch.rand(group_size(model, group), generator=g) < 0.5
        keep[torch.randint(0, keep.numel(), (1,), generator=g)] = True
        keeps[group.name] = keep
    return keeps


def _assert_masked_equals_pruned(model: nn.Module, input_size: tuple[int, ...] = SIZE) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).eval()
    randomize_bn(model)  # a forgotten beta or running mean would show
    keeps = _random_keeps(model)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, keeps))
    prune_groups(pruned, keeps)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, out_masked, out_pruned = model(x), masked(x), pruned(x)
    torch.testing.assert_close(out_pruned, out_masked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full, out_masked, atol=1e-3)  # the pruning did change the function
    for group in channel_groups(pruned):  # traced again on the pruned model: same groups, pruned widths
        assert group_size(pruned, group) == int(keeps[group.name].sum())
    assert [g.name for g in channel_groups(pruned)] == list(keeps)
    return keeps


# ---- torchvision models --------------------------------------------------------------------------


def test_resnet18_only_each_blocks_first_conv(resnet18) -> None:
    groups = trace_channel_groups(resnet18, input_size=SIZE)
    # conv2 meets the shortcut, the stem feeds layer1.0's addition, downsample convs feed additions
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [_key(g) for g in groups] == [
        (f"{p}.conv1", (f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2",), f"{p}.bn1", f"{p}.conv1", None, ()) for p in blocks
    ]
    assert channel_groups(resnet18) == groups  # the fallback of a model without channel_groups()


def test_vgg11_bn_every_conv_the_last_read_by_the_classifier(vgg11_bn) -> None:
    groups = trace_channel_groups(vgg11_bn, input_size=SIZE)
    convs = [i for i, m in enumerate(vgg11_bn.features) if isinstance(m, nn.Conv2d)]
    readers = [f"features.{i}" for i in convs[1:]] + ["classifier.0"]
    assert [_key(g) for g in groups] == [
        (f"features.{i}", (f"features.{i}", f"features.{i + 1}"), (r,), f"features.{i + 1}", f"features.{i}", None, ())
        for i, r in zip(convs, readers, strict=True)
    ]
    # the hidden FCs have no BN to score: no linear group


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_masked_torchvision_model_equals_physically_pruned(name, request) -> None:
    model = request.getfixturevalue(name)
    keeps = _assert_masked_equals_pruned(model)
    if name == "vgg11_bn":  # 7 * 7 columns per channel left the first Linear with the kept channels
        last = keeps["features.25"]
        pruned = copy.deepcopy(model)
        prune_groups(pruned, keeps)
        assert pruned.classifier[0].in_features == int(last.sum()) * 49
        cols = (last.nonzero().flatten()[:, None] * 49 + torch.arange(49)).flatten()
        torch.testing.assert_close(pruned.classifier[0].weight, model.classifier[0].weight[:, cols])


def test_l1_selects_on_a_torchvision_model_and_prunes_it_in_place(resnet18, tmp_path: Path) -> None:
    model = copy.deepcopy(resnet18)
    cb = L1FilterPruning(prune_ratio=0.5, artifact_path=str(tmp_path / "pruned.pt"))
    keeps = cb.select(model)
    assert list(keeps) == [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]
    assert [int(k.sum()) for k in keeps.values()] == [32, 32, 64, 64, 128, 128, 256, 256]
    conv = model.layer2[1].conv1
    kept = cb.select(model)["layer2.1.conv1"]
    l1 = conv.weight.detach().abs().sum((1, 2, 3))
    assert l1[kept].min() >= l1[~kept].max()  # the largest L1 norms are kept
    # no architecture to write for a model outside the zoo: the model itself is pruned, nothing is written
    with pytest.warns(UserWarning, match="not a zoo model.*pruned in place"):
        assert cb.prune(model) is None
    assert model.layer2[1].conv1.out_channels == 64 and model.layer2[1].conv2.in_channels == 64
    assert model.layer2[1].conv2.out_channels == 128  # the block output meets the shortcut: untouched
    assert cb.written is None and not list(tmp_path.iterdir())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, *SIZE)).shape == (1, 10)


def test_l1_target_form_still_needs_a_zoo_model(resnet18) -> None:
    with pytest.raises(ValueError, match="target needs a zoo model"):
        L1FilterPruning(target="A").select(resnet18)


def test_l1_at_the_end_of_training_prunes_a_user_model(tmp_path: Path, tiny_data) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(6 * 4, 10),
    )  # fmt: skip
    cb = L1FilterPruning(prune_ratio=0.5)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="not a zoo model"):
        trainer.fit(ImageClassifier(model=net, num_classes=10, lr=0.1), datamodule=tiny_data)
    assert (net[0].out_channels, net[1].num_features, net[4].in_channels) == (4, 4, 4)
    assert (net[4].out_channels, net[9].in_features) == (3, 3 * 4)
    assert cb.written is None and not list(tmp_path.rglob("*.pt"))


# ---- the safe rule on small custom models ----------------------------------------------------------


class Branchy(nn.Module):
    """A residual add, a concatenation, a sigmoid gate, and one plain conv -> conv -> fc chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.res, self.res_bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.left, self.right = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 4, 1)
        self.gate = nn.Conv2d(10, 10, 1)
        self.mid, self.mid_bn = nn.Conv2d(10, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.last = nn.Conv2d(12, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.res_bn(self.res(x)))  # stem and res meet in the addition
        x = torch.cat([self.left(x), self.right(x)], 1)  # left and right are concatenated
        x = x * torch.sigmoid(self.gate(x))  # the gate multiplies
        x = self.last(F.relu(self.mid_bn(self.mid(x))))  # the plain chain: mid -> last -> fc
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).view(x.size(0), -1))


def test_convs_feeding_add_cat_or_mul_are_never_grouped() -> None:
    torch.manual_seed(0)
    model = Branchy()
    groups = channel_groups(model)
    assert [_key(g) for g in groups] == [
        ("mid", ("mid", "mid_bn"), ("last",), "mid_bn", "mid", None, ()),
        ("last", ("last",), ("fc",), None, "last", None, ()),
    ]
    _assert_masked_equals_pruned(model, (3, 8, 8))


class Tricky(nn.Module):
    """Convs whose channels reach something that a mask or surgery could not follow, and two that are fine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)  # its reader is called twice
        self.shared = nn.Conv2d(4, 4, 3, padding=1)  # called twice
        self.b = nn.Conv2d(4, 6, 1)  # -> sigmoid -> conv: a masked channel would arrive as sigmoid(0) = 0.5
        self.c = nn.Conv2d(6, 6, 1)  # -> conv: fine
        self.d, self.d_bn = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)  # -> sigmoid -> BN -> conv: BN restores zeros
        self.e = nn.Conv2d(6, 6, 1)  # its reader's bias is also read directly
        self.f = nn.Conv2d(6, 6, 1)  # -> addition
        self.g = nn.Conv2d(6, 6, 1, groups=6)  # depthwise
        self.h = nn.Conv2d(6, 4, 1)  # read by a Linear over the width dim, and indexed
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.shared(self.shared(self.a(x)))
        x = self.c(torch.sigmoid(self.b(x)))
        x = self.e(self.d_bn(torch.sigmoid(self.d(x))))
        x = self.f(x) + self.f.bias.sum()
        x = self.h(self.g(x))
        return self.fc(x), x[:, :2]


def test_shared_modules_direct_weights_and_nonzero_activations_are_refused() -> None:
    groups = trace_channel_groups(Tricky(), input_size=(3, 8, 8))
    assert [_key(g) for g in groups] == [
        ("c", ("c",), ("d",), None, "c", None, ()),
        ("d", ("d", "d_bn"), ("e",), "d_bn", "d", None, ()),
    ]


def test_flatten_forms_and_spatial_mean_feed_a_linear() -> None:
    class Heads(nn.Module):
        input_size = (3, 4, 4)  # read by channel_groups(): the flattened heads only fit 4x4 inputs

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 6, 1)
            self.d = nn.Conv2d(3, 2, 1)
            self.fa, self.fb, self.fc = nn.Linear(4 * 16, 1), nn.Linear(5, 1), nn.Linear(6 * 4, 1)
            self.fd = nn.Linear(8, 1)
            self.flat = nn.Flatten()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.fa(self.a(x).reshape(x.shape[0], -1))  # (N, 4, 4, 4) -> (N, 64): 16 columns per channel
            b = self.fb(self.b(x).mean((2, 3)))
            c = self.fc(self.flat(F.max_pool2d(self.c(x), 2)))  # 2 x 2 = 4 columns per channel
            d = self.fd(self.d(x).flatten(2).flatten(1)[:, :8])  # indexing: refused
            return a + b + c + d

    groups = {g.name: g.consumers for g in trace_channel_groups(Heads())}
    assert groups == {"a": ("fa",), "b": ("fb",), "c": ("fc",)}
    torch.manual_seed(0)
    _assert_masked_equals_pruned(Heads(), (3, 4, 4))


def test_linear_bn1d_chains_are_groups_when_scored_by_a_bn() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 5),  # a group
        nn.ReLU(), nn.Linear(5, 3),  # no BN: nothing to score it with
    )  # fmt: skip
    groups = trace_channel_groups(model, input_size=(3, 4, 4))
    assert [_key(g) for g in groups] == [
        ("0", ("0",), ("3",), None, "0", None, ()),
        ("3", ("3", "4"), ("7",), "4", None, None, ()),
    ]
    assert [g.name for g in trace_channel_groups(model, input_size=(3, 4, 4), linear=False)] == ["0"]
    torch.manual_seed(0)
    _assert_masked_equals_pruned(model, (3, 4, 4))


def test_a_channel_selection_is_opaque_even_while_it_selects_everything() -> None:
    # Inlined, a full ChannelSelection returns its input and would vanish from the graph; after pruning
    # the conv before it, its indices would point past the narrower input.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), ChannelSelection(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert trace_channel_groups(model, input_size=(3, 4, 4)) == []


def test_untraceable_model_says_how_to_declare_its_groups() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(TypeError, match=r"(?s)could not trace.*channel_groups\(\) method"):
        channel_groups(DataDependent())
    with pytest.raises(TypeError, match=r"(?s)shape \(2, 3, 32, 32\) and \(2, 3, 224, 224\).*input_size="):
        trace_channel_groups(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 2)))


def test_sync_batchnorm_is_a_batchnorm_and_a_too_small_input_falls_back_to_224() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(64), nn.Conv2d(4, 2, 1))
    expected = [("0", ("0", "1"), ("4",), "1", "0", None, ())]
    assert [_key(g) for g in channel_groups(net)] == expected  # the 64x64 pool does not fit 32x32 inputs
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # what a DDP run with sync_batchnorm holds
    assert isinstance(synced[1], nn.SyncBatchNorm)
    assert [_key(g) for g in channel_groups(synced)] == expected


def test_the_trace_changes_nothing_in_the_model(resnet18) -> None:
    model = copy.deepcopy(resnet18).train()
    model.layer1[0].bn1.eval()  # mixed modes survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_channel_groups(model, input_size=SIZE)
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- zoo models: declarations win, and tracing agrees with them ------------------------------------


def test_declared_groups_take_precedence_over_tracing() -> None:
    model = create_model("cifar_resnet20", cfg=[4, 4, 4, 8, 8, 8, 16, 16, 16])
    groups = channel_groups(model)
    assert groups == model.channel_groups() and all(g.branch for g in groups)  # the declared residual branches
    assert not any(g.branch for g in trace_channel_groups(model))


def _vgg(widths: list[int], pools: set[int]) -> list:
    return [x for i, w in enumerate(widths) for x in ([w, "M"] if i in pools else [w])]


R34_SMALL = [w // 8 for w in [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3]
R50_SMALL = [[w // 8, w // 8 + 1] for w in [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3]
R50_SELECT = [list(range(0, 64, 2)), None, list(range(1, 256, 3))] + [None] * 13
CIFAR_VGG11 = [4, "M", 8, "M", 8, 8, "M", 16, 16, "M", 16, 16]
IMAGENET_VGG11 = [4, "M", 8, "M", 8, 8, "M", 16, 16, "M", 16, 16, "M"]
ZOO = [
    # name, kwargs, groups only the tracer finds (safe, but not part of the paper's prunable widths)
    ("cifar_vgg11", {"cfg": CIFAR_VGG11}, {"classifier.0"}),  # the L1 head's hidden FC (BN1d), never pruned
    ("slim_vgg11", {"cfg": CIFAR_VGG11}, set()),
    ("slim_vgg11_bn", {"cfg": [*IMAGENET_VGG11, 12, 10], "num_classes": 10}, set()),
    ("vgg16_gap", {"cfg": _vgg([4] * 13, {1, 3, 6, 9}), "num_classes": 10}, set()),
    ("cifar_resnet20", {"cfg": [4, 4, 4, 8, 8, 8, 16, 16, 16]}, set()),
    ("sfp_resnet20", {}, set()),
    ("resnet34", {"cfg": R34_SMALL, "num_classes": 10}, set()),
    ("resnet50", {"cfg": R50_SMALL, "num_classes": 10}, {"conv1"}),  # the stem: layer1.0 has a downsample conv
    ("resnet50", {"cfg": R50_SMALL, "select": R50_SELECT, "num_classes": 10}, set()),  # ... read through select
    ("slim_preresnet", {"depth": 11}, set()),
    ("bearpaw_preresnet", {"depth": 11}, {"conv1"}),  # the stem, read by layer1.0's bn1 and downsample conv
    ("slim_densenet", {"depth": 7, "growth": 4}, set()),
    ("densenet", {"depth": 10, "growth": 4, "bottleneck": True, "compression": 0.5}, set()),
]


@pytest.mark.parametrize("name, kwargs, extra", ZOO, ids=[f"{z[0]}-{i}" for i, z in enumerate(ZOO)])
def test_traced_groups_are_the_declared_ones(name, kwargs, extra) -> None:
    model = create_model(name, **kwargs)
    declared = {g.name: g for g in model.channel_groups()}
    traced = {g.name: g for g in trace_channel_groups(model, input_size=(3, 32, 32))}
    assert set(traced) - set(declared) == extra
    common = set(traced) & set(declared)
    assert common or name == "slim_densenet"  # its only prunable channels are read through selections
    for n in common:  # same layers sliced; only the declared residual branch is the zoo's own knowledge
        t, d = traced[n], declared[n]
        assert (t.producers, t.consumers, t.bn, t.conv, t.selection) == (d.producers, d.consumers, d.bn, d.conv, None)
    # what the tracer misses is what only a declaration can express: channel selections
    missed = set(declared) - set(traced)
    assert all(declared[n].selection is not None for n in missed)
