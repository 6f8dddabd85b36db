"""CIFAR pre-activation bottleneck ResNets (depth 9n+2): Network Slimming's PreResNet-164 and bearpaw's
PreResNet-110 of weight-level pruning (docs/paper-settings.md §2.4, 2.6, 12.10).

Layout: stem conv3x3(3 -> 16) without BN; three stages of ``n = (depth - 2) // 9`` bottleneck blocks
with planes 16 / 32 / 64 and expansion 4 (stream widths 64 / 128 / 256); then BN -> [selection] -> ReLU
-> global average pool -> Linear. A block computes::

    BN1(in) -> [ChannelSelection] -> ReLU -> conv1 1x1 (cfg[0] -> cfg[1]) -> BN2 -> ReLU
    -> conv2 3x3, stride s (cfg[1] -> cfg[2]) -> BN3 -> ReLU -> conv3 1x1 (cfg[2] -> 4 * planes)

and adds its shortcut: the identity, or for the first block of each stage a 1x1 conv without BN
(stride 1, 2, 2) applied to the *raw* block input. There is no post-activation.

Width config ``cfg`` (the reference code's format, length ``9n + 1``, 163 for depth 164): three ints per
block, ``[#channels conv1 reads, conv1 out, conv2 out]``, then one final int, the number of channels the
classifier reads. Stream widths (BN1, conv3 outputs, the final BN) never change: Network Slimming
prunes a block's *view* of the stream through a channel selection, the inner widths physically, and
leaves conv3 full because it feeds the residual addition. Default (depth 164)::

    stage 1: [16, 16, 16] + [64, 16, 16] * 17     stage 2: [64, 32, 32] + [128, 32, 32] * 17
    stage 3: [128, 64, 64] + [256, 64, 64] * 17   final:   [256]

A block whose triple contains a 0 has no residual branch (paper design: a residual branch pruned to zero
channels is removed, the block becomes its shortcut); :meth:`PreResNet.arch_kwargs` reports it as
``[0, 0, 0]``.

Channel selections (``slim_*`` models only), kwarg ``select``: one entry per selection point in forward
order, i.e. per block (after its BN1), then the final one (after the last BN): ``3n + 1`` entries. An entry
is a strictly increasing list of kept stream channels, or None to keep them all; ``select=None`` keeps all
everywhere. ``cfg`` must agree with it: a block's first entry equals the number of channels its selection
keeps (the stream width for None), and so does the final entry. ``cfg`` alone cannot say *which* stream
channels are read (docs/paper-settings.md §6.3), so a smaller count needs explicit indices.

The bearpaw models (``bearpaw_*``) use the same ``cfg`` format without selections: each block's first
entry and the final entry must then equal the stream width; only conv1/conv2 output widths are free.

Prunable channel groups (:meth:`PreResNet.channel_groups`, one per ``cfg`` entry): each block's selection
(slim only, scored by BN1), conv1's and conv2's outputs (their residual branch vanishes when one of them
reaches zero), and the final selection. conv3 and the downsample convs feed the addition and are never cut.

Init (docs/paper-settings.md §1.5): conv He fan-out; BN gamma 0.5 (slimming) or 1 (bearpaw), beta 0; Linear default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core import init
from lit_prune.core.groups import ChannelGroup
from lit_prune.models.base import ChannelSelection, ResidualBlock, ZooModel, check_select
from lit_prune.models.registry import register_model

_STAGE_PLANES = (16, 32, 64)
_EXPANSION = 4


class Bottleneck(ResidualBlock):
    """Pre-activation bottleneck block; ``width = (reads, conv1 out, conv2 out)``, a 0 = no branch.

    Without a branch, ``bn1 .. conv3`` (and ``select``) are None, exactly as surgery leaves a block whose
    branch it removed; the block is then its shortcut.
    """

    #: the residual branch's submodules in forward order (surgery removes them together)
    BRANCH = ("bn1", "select", "conv1", "bn2", "conv2", "bn3", "conv3")
    branch_end, branch_end_bn = "conv3", None  # pre-activation: conv3's output is added as it is

    def __init__(
        self,
        in_planes: int,
        width: Sequence[int],
        planes: int,
        stride: int,
        downsample: bool,
        selection: bool,
        indices: Sequence[int] | None,
    ) -> None:
        super().__init__()
        for name in self.BRANCH:
            setattr(self, name, None)
        if all(w > 0 for w in width):
            reads, mid1, mid2 = width
            self.bn1 = nn.BatchNorm2d(in_planes)
            if selection:
                self.select = ChannelSelection(in_planes, indices)
            self.conv1 = nn.Conv2d(reads, mid1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid1)
            self.conv2 = nn.Conv2d(mid1, mid2, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(mid2)
            self.conv3 = nn.Conv2d(mid2, planes * _EXPANSION, 1, bias=False)
        # a plain conv (not a Sequential) so that surgery sees it by name
        self.downsample = (
            nn.Conv2d(in_planes, planes * _EXPANSION, 1, stride, bias=False) if downsample else None
        )

    @property
    def has_branch(self) -> bool:
        return self.conv1 is not None

    def width(self) -> list[int]:
        if not self.has_branch:
            return [0, 0, 0]
        return [self.conv1.in_channels, self.conv1.out_channels, self.conv2.out_channels]

    def shortcut_output(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride)
        shortcut = self.shortcut_output(x)
        if not self.has_branch:
            return shortcut
        out = self.bn1(x)
        if self.select is not None:
            out = self.select(out)  # (N, in_planes, H, W) -> (N, reads, H, W)
        out = self.conv1(F.relu(out))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreResNet(ZooModel):
    """Pre-activation bottleneck ResNet for 32x32 inputs (see the module docstring for ``cfg``/``select``).

    Args:
        depth: 9n+2 (164 for Network Slimming, 110 for weight-level pruning).
        num_classes: classifier outputs.
        cfg: width config, None for the unpruned widths.
        select: kept stream channels per selection point (needs ``channel_selection``), None = all.
        channel_selection: put a :class:`ChannelSelection` after every block's BN1 and the final BN.
        bn_gamma: initial BN weight (0.5 for slimming, 1 for bearpaw).

    Raises:
        ValueError: on a depth that is not 9n+2, or a ``cfg``/``select`` of the wrong length, with
            negative widths, or inconsistent with each other or with the stream widths.
    """

    def __init__(
        self,
        depth: int = 164,
        num_classes: int = 10,
        cfg: Sequence[int] | None = None,
        select: Sequence[Sequence[int] | None] | None = None,
        channel_selection: bool = True,
        bn_gamma: float = 0.5,
    ) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"PreResNet depth must be 9n+2 with n >= 1 (11, 20, ..., 110, 164), got {depth}")
        n = (depth - 2) // 9
        self.depth, self.channel_selection, self.bn_gamma = depth, channel_selection, bn_gamma
        stream_in = _stream_inputs(n)  # width of the tensor each selection point sees
        cfg = _default_cfg(n) if cfg is None else list(cfg)
        name = f"PreResNet-{depth}"
        if len(cfg) != 9 * n + 1 or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in cfg):
            raise ValueError(
                f"{name} needs cfg of {9 * n + 1} non-negative ints (3 per block: [channels conv1 reads, "
                f"conv1 out, conv2 out], then the classifier's input width), got {len(cfg)} entries: {cfg}"
            )
        if cfg[-1] == 0:
            raise ValueError(f"{name}: the classifier must read at least one channel (cfg[-1] is 0)")
        select = check_select(select, stream_in, channel_selection, name,
                              "one per block after its BN1, then the final one")
        for i, c in enumerate(stream_in):
            k = 3 * i if i < 3 * n else 9 * n  # the cfg entry that counts the channels read at point i
            if i < 3 * n and 0 in cfg[k : k + 3]:
                if select[i]:
                    raise ValueError(
                        f"{name}: block {i} has no residual branch (a 0 in cfg[{k}:{k + 3}] = "
                        f"{cfg[k : k + 3]}), so select[{i}] must be None or [], got {select[i]}"
                    )
                continue
            kept = c if select[i] is None else len(select[i])
            if cfg[k] != kept:
                where = f"block {i}" if i < 3 * n else "the classifier"
                hint = (
                    f"pass select[{i}] with {cfg[k]} channel indices, or set cfg[{k}] = {kept}"
                    if channel_selection
                    else "models without channel selection read the whole stream"
                )
                how = f"select[{i}] keeps {kept}" if select[i] is not None else "no selection: all"
                raise ValueError(
                    f"{name}: cfg[{k}] = {cfg[k]} but {where} reads {kept} of its {c} input channels "
                    f"({how}); {hint}"
                )

        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        in_planes, point = 16, 0
        for s, planes in enumerate(_STAGE_PLANES):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                width = cfg[3 * point : 3 * point + 3]
                blocks.append(
                    Bottleneck(in_planes, width, planes, stride, b == 0, channel_selection, select[point])
                )
                in_planes, point = planes * _EXPANSION, point + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.select = ChannelSelection(in_planes, select[-1]) if channel_selection else None
        self.fc = nn.Linear(cfg[-1], num_classes)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 256, 8, 8)
        x = self.bn(x)
        if self.select is not None:
            x = self.select(x)  # (N, cfg[-1], 8, 8)
        x = F.adaptive_avg_pool2d(F.relu(x), 1)
        return self.fc(torch.flatten(x, 1))

    def blocks(self) -> list[Bottleneck]:
        return [b for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    def selections(self) -> list[ChannelSelection | None]:
        """The selection of every selection point in forward order (None for a block without branch)."""
        return [b.select for b in self.blocks()] + [self.select]

    def arch_kwargs(self) -> dict[str, Any]:
        cfg = [w for b in self.blocks() for w in b.width()] + [self.fc.in_features]
        if not self.channel_selection:
            return {"cfg": cfg}
        select = [[] if s is None else s.kept() for s in self.selections()]
        return {"cfg": cfg, "select": None if all(s is None for s in select) else select}

    def channel_groups(self) -> list[ChannelGroup]:
        # Per block with a branch: the stream channels conv1 reads (slim models: through the selection,
        # scored by BN1), conv1's and conv2's outputs. conv3's outputs and the downsample meet the
        # residual addition and are never cut. A selection cannot vanish (its masked model would not equal
        # a removed branch): pruning it to zero is refused by surgery, use a per-layer floor.
        groups = []
        for s in range(1, 4):
            for b, block in enumerate(getattr(self, f"layer{s}")):
                if not block.has_branch:
                    continue
                p = f"layer{s}.{b}"
                branch = tuple(f"{p}.{m}" for m in Bottleneck.BRANCH if getattr(block, m) is not None)
                if block.select is not None:
                    sel = f"{p}.select"
                    reader = (f"{p}.conv1",)
                    groups.append(ChannelGroup(name=sel, selection=sel, consumers=reader, bn=f"{p}.bn1"))
                for conv, bn, nxt in (("conv1", "bn2", "conv2"), ("conv2", "bn3", "conv3")):
                    groups.append(
                        ChannelGroup(
                            name=f"{p}.{conv}",
                            producers=(f"{p}.{conv}", f"{p}.{bn}"),
                            consumers=(f"{p}.{nxt}",),
                            bn=f"{p}.{bn}",
                            conv=f"{p}.{conv}",
                            branch=branch,
                        )
                    )
        if self.select is not None:
            groups.append(ChannelGroup(name="select", selection="select", consumers=("fc",), bn="bn"))
        return groups

    def reset_parameters(self) -> None:
        init.he_bn_init_(self, self.bn_gamma)  # docs/paper-settings.md §1.5
        self.fc.reset_parameters()


def _default_cfg(n: int) -> list[int]:
    cfg: list[int] = []
    in_planes = 16
    for planes in _STAGE_PLANES:
        for _ in range(n):
            cfg += [in_planes, planes, planes]
            in_planes = planes * _EXPANSION
    return cfg + [in_planes]


def _stream_inputs(n: int) -> list[int]:
    """Width of the stream at each of the 3n + 1 selection points (block inputs, then the final BN)."""
    cfg = _default_cfg(n)
    return cfg[0:-1:3] + cfg[-1:]


def _slim(
    depth: int, cfg: Sequence[int] | None, num_classes: int, select: Sequence[Sequence[int] | None] | None
) -> PreResNet:
    return PreResNet(depth, num_classes, cfg, select, channel_selection=True, bn_gamma=0.5)


def _bearpaw(depth: int, cfg: Sequence[int] | None, num_classes: int) -> PreResNet:
    return PreResNet(depth, num_classes, cfg, None, channel_selection=False, bn_gamma=1.0)


@register_model("slim_preresnet")
def slim_preresnet(
    cfg: Sequence[int] | None = None,
    num_classes: int = 10,
    depth: int = 164,
    select: Sequence[Sequence[int] | None] | None = None,
) -> PreResNet:
    """Network Slimming's PreResNet of any depth 9n+2, with channel selections (docs/paper-settings.md §2.4)."""
    return _slim(depth, cfg, num_classes, select)


@register_model("slim_preresnet164")
def slim_preresnet164(
    cfg: Sequence[int] | None = None,
    num_classes: int = 10,
    select: Sequence[Sequence[int] | None] | None = None,
) -> PreResNet:
    """Network Slimming's PreResNet-164 (n = 18 bottleneck blocks per stage, ~1.7M parameters)."""
    return _slim(164, cfg, num_classes, select)


@register_model("bearpaw_preresnet")
def bearpaw_preresnet(cfg: Sequence[int] | None = None, num_classes: int = 10, depth: int = 110) -> PreResNet:
    """bearpaw's bottleneck PreResNet of any depth 9n+2, no channel selection, BN gamma 1 (docs/paper-settings.md
    §2.6)."""
    return _bearpaw(depth, cfg, num_classes)


@register_model("bearpaw_preresnet110")
def bearpaw_preresnet110(cfg: Sequence[int] | None = None, num_classes: int = 10) -> PreResNet:
    """Weight-level pruning's "PreResNet-110": bottleneck, n = 12 blocks per stage (docs/paper-settings.md §12.10)."""
    return _bearpaw(110, cfg, num_classes)
