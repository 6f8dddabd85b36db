"""ResNets with projection shortcuts: ImageNet ResNet-34/50 (torchvision layout) and bearpaw's CIFAR ResNet.

**ImageNet** (docs/paper-settings.md §2.7): ``resnet34`` (BasicBlocks [3, 4, 6, 3]) and ``resnet50`` (Bottlenecks
[3, 4, 6, 3]) have torchvision's layout and module names (``conv1, bn1, relu, maxpool, layer1..layer4,
avgpool, fc``; blocks ``conv1, bn1, conv2, bn2[, conv3, bn3], downsample.0, downsample.1``), so at full
width ``model.load_state_dict(torchvision.models.resnet34().state_dict())`` works and gives the same
outputs. Input 3x224x224.

**bearpaw CIFAR** (docs/paper-settings.md §2.6; ``bearpaw_resnet50``, the lottery-ticket "ResNet-50"): depth 6n+2 with a
3x3 stem of 16 channels and three stages of 16/32/64 planes. BasicBlocks below depth 54, Bottlenecks from
54 on, so depth 50 is 3 x 8 BasicBlocks. Option-B shortcut (1x1 conv + BN) wherever the shape changes.
Input 3x32x32. It shares the block code of the ImageNet models.

Width config ``cfg``, one entry per block in order (layer1[0], layer1[1], ..., last block):

* BasicBlock families (``resnet34``, ``bearpaw_resnet50``): an int, the output width of the block's first
  conv (the only width L1-norm pruning changes; docs/paper-settings.md §3.4). ResNet-34 has 16 entries.
* Bottleneck families (``resnet50``): a pair ``[conv1 out, conv2 out]``; ResNet-50 has 16 pairs. conv3
  always outputs 4 x planes, so the residual stream keeps its width (ThiNet and He et al. prune only
  conv1 and conv2). The reference code's 48-entry triples ``[block input, conv1, conv2]`` map onto this
  format by dropping the first, informational, element of each triple.

A block width of 0 (a pair ``[0, 0]`` for Bottlenecks) removes the block's residual branch: the block
becomes its shortcut followed by ReLU. The FC input is always ``final planes x expansion`` (512 x expansion
on ImageNet), not ``cfg[-1]`` as in the reference ResNet-34 (docs/paper-settings.md §12.11).

Optional, for He et al.'s ResNet-50-2x (docs/paper-settings.md §2.7):

* ``select``: one entry per block, the block-input channels read by the block's first conv (a
  :class:`~lit_prune.models.base.ChannelSelection` in front of ``conv1``; the shortcut still reads the full
  input), or None for a block that reads all of them. ``select=None`` (the default) adds no
  selection layers at all, which keeps torchvision's state-dict keys.
* ``downsample_bias=True``: the shortcut's 1x1 conv has a bias, as in the reference ResNet-50 code.
* ``gates=True``: every block that has a residual branch gets Sparse Structure Selection's factor lambda_b
  (a :class:`~lit_prune.core.gates.BlockGate` named ``gate``, initialised to 1) on the branch output before
  the addition: ``relu(lambda_b * bn_last(...) + shortcut)``. Off by default (torchvision's state dicts).

Named width configs (the paper's predefined pruned architectures):

* ``resnet34``: ``"A"``, ``"B"`` (L1-norm pruning, docs/paper-settings.md §3.4).
* ``resnet50``: ``"thinet30"``, ``"thinet50"``, ``"thinet70"`` (ThiNet, docs/paper-settings.md §2.7 and 4: conv1 and
conv2
  of every block keep 19/38/76/153, 32/64/128/256 or 44/89/179/358 channels in stages 1-4) and ``"2x"`` (He
  et al.'s ResNet-50-2x, docs/paper-settings.md §2.7 and 5: ``cfg_2x`` plus the 16 channel selections shipped as
  ``lit_prune/data/resnet50_2x_channel_selection.json``). All four carry ``downsample_bias=True``, as the
  reference ``thinetresnet.py`` / ``resnet_2x.py`` do (a bias in front of a BN: no effect on MACs or
  accuracy, but the state-dict keys are those of the reference models).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
from torch import nn

from lit_prune.core import init
from lit_prune.core.gates import BlockGate
from lit_prune.core.groups import ChannelGroup
from lit_prune.models.base import ChannelSelection, ResidualBlock, ZooModel
from lit_prune.models.registry import register_model, register_width_config

# depth -> (block kind, blocks per stage), torchvision's layouts
_IMAGENET_LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_IMAGENET_PLANES = (64, 128, 256, 512)
_CIFAR_PLANES = (16, 32, 64)


class _Block(ResidualBlock):
    """Shared parts of the two residual blocks: input selection, shortcut, and the width read-back."""

    expansion = 1
    #: how many inner widths one cfg entry gives (1 for BasicBlock, 2 for Bottleneck)
    num_widths = 1

    #: the module whose output an SSS gate scales (lit_prune.core.gates.fold_gates_ folds lambda_b into it)
    gate_folds_into = "bn2"

    def __init__(self, select: ChannelSelection | None) -> None:
        super().__init__()
        if select is not None:  # registered only when used, so that torchvision checkpoints load strictly
            self.select = select
        self.relu = nn.ReLU()
        self.gate: BlockGate | None = None  # a plain attribute unless gated: no state-dict key

    @property
    def has_branch(self) -> bool:
        """False when the residual branch was removed (width 0): the block is its shortcut."""
        return getattr(self, "conv1", None) is not None

    def widths(self) -> list[int]:
        """Current inner widths read from the convs (zeros when the branch is removed)."""
        if not self.has_branch:
            return [0] * self.num_widths
        return [getattr(self, f"conv{i + 1}").out_channels for i in range(self.num_widths)]

    def _branch_input(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C_in, H, W) -> (N, len(select), H, W); only the branch reads the selected channels
        return self.select(x) if hasattr(self, "select") else x

    def shortcut_output(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _gated(self, out: torch.Tensor) -> torch.Tensor:
        # SSS: lambda_b times the branch output, before the addition
        return out if self.gate is None else self.gate(out)


class BasicBlock(_Block):
    """Two 3x3 convs: ``conv1`` (in -> width, stride) and ``conv2`` (width -> planes)."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        widths: Sequence[int],
        downsample: nn.Module | None = None,
        select: ChannelSelection | None = None,
        gate: bool = False,
    ) -> None:
        super().__init__(select)
        (width,) = widths
        c_in = in_planes if select is None else select.indices.numel()
        if width > 0:
            self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            if gate:
                self.gate = BlockGate()
        self.downsample = downsample  # after the convs: state-dict order as torchvision's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut_output(x)  # (N, planes, H/stride, W/stride)
        if not self.has_branch:
            return self.relu(identity)
        out = self.relu(self.bn1(self.conv1(self._branch_input(x))))  # (N, width, H/stride, W/stride)
        out = self._gated(self.bn2(self.conv2(out)))  # (N, planes, H/stride, W/stride)
        return self.relu(out + identity)


class Bottleneck(_Block):
    """1x1 ``conv1`` (in -> w1), 3x3 ``conv2`` (w1 -> w2, stride), 1x1 ``conv3`` (w2 -> 4 planes)."""

    expansion = 4
    num_widths = 2
    gate_folds_into = "bn3"
    branch_end, branch_end_bn = "conv3", "bn3"

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        widths: Sequence[int],
        downsample: nn.Module | None = None,
        select: ChannelSelection | None = None,
        gate: bool = False,
    ) -> None:
        super().__init__(select)
        w1, w2 = widths
        c_in = in_planes if select is None else select.indices.numel()
        if w1 > 0:
            self.conv1 = nn.Conv2d(c_in, w1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(w1)
            self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(w2)
            self.conv3 = nn.Conv2d(w2, planes * self.expansion, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            if gate:
                self.gate = BlockGate()
        self.downsample = downsample  # after the convs: state-dict order as torchvision's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut_output(x)  # (N, 4 planes, H/stride, W/stride)
        if not self.has_branch:
            return self.relu(identity)
        out = self.relu(self.bn1(self.conv1(self._branch_input(x))))  # (N, w1, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, w2, H/stride, W/stride)
        out = self._gated(self.bn3(self.conv3(out)))  # (N, 4 planes, H/stride, W/stride)
        return self.relu(out + identity)


_BLOCKS: dict[str, type[_Block]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _is_width(w: Any) -> bool:
    return isinstance(w, int) and not isinstance(w, bool) and w >= 0


class _ResNet(ZooModel):
    """Stages, width read-back and init shared by the ImageNet and bearpaw ResNets."""

    block: type[_Block]

    def _parse_cfg(
        self, cfg: Sequence[Any] | None, layers: Sequence[int], planes: Sequence[int], label: str
    ) -> list[list[int]]:
        """Validate ``cfg`` and return one list of inner widths per block."""
        n = sum(layers)
        if cfg is None:
            per_block = [p for p, k in zip(planes, layers, strict=True) for _ in range(k)]
            return [[p] * self.block.num_widths for p in per_block]
        cfg = list(cfg)
        if self.block is BasicBlock:
            if len(cfg) != n or not all(_is_width(w) for w in cfg):
                raise ValueError(
                    f"{label} needs cfg of {n} non-negative ints (the first-conv width of each BasicBlock), "
                    f"got {cfg}"
                )
            return [[w] for w in cfg]
        pairs_ok = len(cfg) == n and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_width(w) for w in p) for p in cfg
        )
        if not pairs_ok:
            raise ValueError(
                f"{label} needs cfg of {n} [conv1, conv2] width pairs (non-negative ints, one pair per "
                f"Bottleneck), got {cfg}"
            )
        for i, (w1, w2) in enumerate(cfg):
            if (w1 == 0) != (w2 == 0):
                raise ValueError(
                    f"{label} cfg entry {i} is {[w1, w2]}: a Bottleneck's widths must be both 0 (residual "
                    "branch removed) or both positive"
                )
        return [list(p) for p in cfg]

    def _make_stages(
        self,
        in_planes: int,
        planes: Sequence[int],
        layers: Sequence[int],
        widths: list[list[int]],
        select: Sequence[Sequence[int] | None] | None,
        downsample_bias: bool,
        label: str,
        gates: bool = False,
    ) -> int:
        """Add ``layer1``, ``layer2``, ...; returns the width of the residual stream at the end."""
        n = sum(layers)
        if select is not None and len(select) != n:
            raise ValueError(
                f"{label} needs select of {n} entries (the block-input channels each block's conv1 reads, "
                f"or None for all), got {len(select)}"
            )
        i = 0
        for s, (p, k) in enumerate(zip(planes, layers, strict=True)):
            blocks = []
            for b in range(k):
                stride = 2 if s > 0 and b == 0 else 1
                out = p * self.block.expansion
                downsample = None
                if stride != 1 or in_planes != out:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_planes, out, 1, stride, bias=downsample_bias), nn.BatchNorm2d(out)
                    )
                sel = None if select is None else ChannelSelection(in_planes, select[i])
                blocks.append(self.block(in_planes, p, stride, widths[i], downsample, sel, gates))
                in_planes, i = out, i + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        return in_planes

    def blocks(self) -> list[_Block]:
        """Residual blocks in order (the order of ``cfg`` and ``select``)."""
        return [m for m in self.modules() if isinstance(m, _Block)]

    def arch_kwargs(self) -> dict[str, Any]:
        blocks = self.blocks()
        widths = [b.widths() for b in blocks]
        kwargs: dict[str, Any] = {"cfg": [w[0] for w in widths] if self.block is BasicBlock else widths}
        if any(hasattr(b, "select") for b in blocks):
            kwargs["select"] = [b.select.kept() if hasattr(b, "select") else None for b in blocks]
        if any(b.downsample is not None and b.downsample[0].bias is not None for b in blocks):
            kwargs["downsample_bias"] = True
        if any(b.gate is not None for b in blocks):
            kwargs["gates"] = True
        return kwargs

    def channel_groups(self) -> list[ChannelGroup]:
        # Inner widths of each branch, plus the block-input selection where there is one; the block
        # output (conv2 of BasicBlock, conv3 of Bottleneck) meets the shortcut and is never cut.
        groups = []
        for path, block in self.named_modules():
            if not isinstance(block, _Block) or not block.has_branch:
                continue
            convs = [f"{path}.conv{i}" for i in range(1, block.num_widths + 2)]  # inner convs + the output conv
            branch = tuple(p for c in convs for p in (c, c.replace("conv", "bn")))
            if block.gate is not None:  # the gate goes with its branch
                branch += (f"{path}.gate",)
            if hasattr(block, "select"):
                groups.append(ChannelGroup(name=f"{path}.select", selection=f"{path}.select", consumers=(convs[0],)))
            for conv, nxt in zip(convs, convs[1:]):
                bn = conv.replace("conv", "bn")
                groups.append(ChannelGroup(name=conv, producers=(conv, bn), consumers=(nxt,), bn=bn, conv=conv,
                                           branch=branch))
        return groups

    def reset_parameters(self) -> None:
        init.he_bn_init_(self, 1.0)  # docs/paper-settings.md §1.5
        self.fc.reset_parameters()


class ImageNetResNet(_ResNet):
    """torchvision-layout ResNet for 224x224 inputs (docs/paper-settings.md §2.7).

    Args:
        depth: 18, 34 (BasicBlocks), 50, 101 or 152 (Bottlenecks).
        num_classes: FC outputs.
        cfg: per-block widths (see the module docstring); None for the unpruned network.
        select: per-block input channel selections for ``conv1``, or None for no selection layers.
        downsample_bias: give the shortcut's 1x1 conv a bias (the reference ResNet-50 code).
        gates: give every residual branch an SSS block factor (see the module docstring).

    Raises:
        ValueError: unknown depth, or ``cfg``/``select`` of the wrong length or type.
    """

    input_size = (3, 224, 224)

    def __init__(
        self,
        depth: int,
        num_classes: int = 1000,
        cfg: Sequence[Any] | None = None,
        select: Sequence[Sequence[int] | None] | None = None,
        downsample_bias: bool = False,
        gates: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _IMAGENET_LAYOUTS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET_LAYOUTS)}, got {depth}")
        kind, layers = _IMAGENET_LAYOUTS[depth]
        self.depth, self.block = depth, _BLOCKS[kind]
        label = f"ResNet-{depth}"
        widths = self._parse_cfg(cfg, layers, _IMAGENET_PLANES, label)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        out = self._make_stages(64, _IMAGENET_PLANES, layers, widths, select, downsample_bias, label, gates)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(out, num_classes)  # 512 * expansion whatever cfg says (docs/paper-settings.md §12.11)
        self.reset_parameters()

    def add_channel_samplers(self) -> int:
        """Put an all-channel selection in front of the first conv of every residual branch that has none
        (:class:`lit_prune.core.protocols.ChannelSamplers`; ``select`` in :meth:`arch_kwargs` records them).

        Each reads every channel until pruning narrows it; the shortcut keeps the full input.

        Returns:
            How many were added.
        """
        added = 0
        for block in self.blocks():
            if block.has_branch and not hasattr(block, "select"):
                block.select = ChannelSelection(block.conv1.in_channels).to(block.conv1.weight.device)
                added += 1
        return added

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512 * expansion, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BearpawResNet(_ResNet):
    """bearpaw's CIFAR ResNet (docs/paper-settings.md §2.6): depth 6n+2, BasicBlocks below 54, option-B shortcuts.

    Args:
        depth: 6n+2 (8, 14, 20, ..., 50 for the lottery-ticket "ResNet-50"); Bottlenecks from 54 on.
        num_classes: FC outputs.
        cfg: per-block widths (ints for BasicBlocks, pairs for Bottlenecks); None for the unpruned network.
        gates: give every residual branch an SSS block factor (see the module docstring).

    Raises:
        ValueError: a depth that is not 6n+2, or a bad ``cfg``.
    """

    input_size = (3, 32, 32)

    def __init__(
        self, depth: int, num_classes: int = 10, cfg: Sequence[Any] | None = None, gates: bool = False
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"bearpaw ResNet depth must be 6n+2 with n >= 1 (8, 14, ..., 50), got {depth}")
        n = (depth - 2) // 6
        # as in the reference, depth >= 54 switches to Bottlenecks but keeps n = (depth - 2) // 6
        self.depth, self.block = depth, Bottleneck if depth >= 54 else BasicBlock
        layers = (n, n, n)
        label = f"bearpaw ResNet-{depth}"
        widths = self._parse_cfg(cfg, layers, _CIFAR_PLANES, label)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        out = self._make_stages(16, _CIFAR_PLANES, layers, widths, None, False, label, gates)
        # the reference uses AvgPool2d(8); on 32x32 inputs this is the same global average
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(out, num_classes)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64 * expansion, 8, 8)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet34")
def resnet34(
    cfg: Sequence[int] | None = None,
    num_classes: int = 1000,
    select: Sequence[Sequence[int] | None] | None = None,
    downsample_bias: bool = False,
    gates: bool = False,
) -> ImageNetResNet:
    """ImageNet ResNet-34 of L1-norm pruning; ``cfg`` is 16 first-conv widths (named configs "A", "B")."""
    return ImageNetResNet(34, num_classes, cfg, select, downsample_bias, gates)


@register_model("resnet50")
def resnet50(
    cfg: Sequence[Sequence[int]] | None = None,
    num_classes: int = 1000,
    select: Sequence[Sequence[int] | None] | None = None,
    downsample_bias: bool = False,
    gates: bool = False,
) -> ImageNetResNet:
    """ImageNet ResNet-50 of ThiNet / He et al.; ``cfg`` is 16 ``[conv1, conv2]`` width pairs."""
    return ImageNetResNet(50, num_classes, cfg, select, downsample_bias, gates)


@register_model("bearpaw_resnet50")
def bearpaw_resnet50(cfg: Sequence[int] | None = None, num_classes: int = 10, gates: bool = False) -> BearpawResNet:
    """bearpaw CIFAR ResNet depth 50 = 3 x 8 BasicBlocks (the lottery-ticket "ResNet-50"); 24 widths."""
    return BearpawResNet(50, num_classes, cfg, gates)


# The paper's L1-norm targets (docs/paper-settings.md §3.4): first-conv widths per block.
register_width_config("resnet34", "A", [64, 44, 44, 128, 89, 89, 128, 256] + [179] * 4 + [256, 512, 512, 512])
register_width_config("resnet34", "B", [64, 32, 32, 128, 51, 51, 128, 256] + [153] * 4 + [256, 512, 512, 512])


# ThiNet ResNet-50s (docs/paper-settings.md §2.7): int(keep * planes) channels for conv1 and conv2 of every block of a
# stage.
_THINET_KEEPS = {"thinet30": (19, 38, 76, 153), "thinet50": (32, 64, 128, 256), "thinet70": (44, 89, 179, 358)}
for _name, _keeps in _THINET_KEEPS.items():
    register_width_config(
        "resnet50", _name, [[k, k] for k, n in zip(_keeps, _IMAGENET_LAYOUTS[50][1], strict=True) for _ in range(n)],
        downsample_bias=True,
    )

# He et al.'s ResNet-50-2x (docs/paper-settings.md §2.7): the reference's cfg_2x triples [block input, conv1, conv2]
# with the
# informational first element dropped (it equals the number of channels the block's selection keeps).
_RESNET50_2X_CFG = [
    [64, 55], [51, 39], [50, 37], [128, 106], [105, 72], [105, 72], [128, 110], [256, 225],
    [209, 147], [204, 158], [212, 155], [211, 148], [256, 213], [512, 433], [512, 437], [512, 440],
]  # fmt: skip


def resnet50_2x_selection() -> list[list[int]]:
    """The 16 block-input channel selections of ResNet-50-2x (package data, from the reference's filter.pkl).

    Returns:
        One strictly increasing index list per Bottleneck, in block order; their lengths are 35, 101, 97,
        144, 205, 198, 288, 278, 418, 407, 423, 412, 595, 606, 1222, 1147.
    """
    text = resources.files("lit_prune").joinpath("data/resnet50_2x_channel_selection.json").read_text()
    return [block["kept"] for block in json.loads(text)["blocks"]]


register_width_config("resnet50", "2x", _RESNET50_2X_CFG, select=resnet50_2x_selection(), downsample_bias=True)
