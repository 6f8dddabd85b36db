"""Pre-activation ("v2") ImageNet ResNet-50 of Sparse Structure Selection, and its block-pruned variants
ResNet-41 / 32 / 26 (docs/paper-settings.md §2.7, 7.2, 11.5).

Layout (MXNet ``SSS:symbol/resnet.py``): stem conv 7x7/2 (3 -> 64) - BN - ReLU - max-pool 3x3/2; four stages
of pre-activation bottleneck units (planes 64 / 128 / 256 / 512, expansion 4, stride 2 on the 3x3 conv of
each stage's first unit from stage 2 on); then BN - ReLU - global average pool - Linear. A unit computes::

    act = ReLU(BN1(x))
    F   = conv3 1x1 (ReLU(BN3(conv2 3x3 (ReLU(BN2(conv1 1x1 (act)))))))
    out = shortcut + F,  shortcut = x, or for a stage's first unit a 1x1 projection conv (stride s) of *act*

The projection reads the **pre-activated** input ``act``, not ``x`` (unlike the CIFAR PreResNet), and there
is no activation after the addition. The MXNet code has no bias in the convs and a biased FC; its ``bn_data``
input normalisation is not part of the SSS symbol and is not reproduced.

Width config ``cfg``: one ``[a, b]`` pair per stage (YAML-friendly lists; tuples are accepted too):

* ``b`` (bool): whether the stage's first (projection) unit keeps its residual branch. If False, only its
  ``BN1 - ReLU - projection conv`` remains: the stage still changes width and resolution.
* ``a`` (int): the number of units of the stage that keep a residual branch, *counting the first unit when
  b is True*. So a stage of ``n`` units allows ``1 <= a <= n`` with b True and ``0 <= a <= n - 1`` with
  b False, and the network's depth is ``2 + 3 * sum(a)`` (stem conv + FC + three convs per branch;
  projection convs are not counted), as the paper counts it: ResNet-41 = 2 + 3 * 13.

Units are built in order: the first unit (``layerS.0``), then ``a`` (b False) or ``a - 1`` (b True) identity
units ``layerS.1 ...``. All identity units of a stage have the same shapes, so *which* ones SSS removed does
not matter to a from-scratch model. Named configs: ``"resnet41"``, ``"resnet32"``, ``"resnet26"``; the default
``[[3, True], [4, True], [6, True], [3, True]]`` is ResNet-50.

Optional ``widths``: one ``[conv1 out, conv2 out]`` pair per unit that keeps a branch, in forward order, for
channel-pruned variants (None: the full widths ``planes, planes``). :meth:`PreActResNet.arch_kwargs` reports
it only when some width differs from the full one.

Structured pruning (:meth:`PreActResNet.channel_groups`): conv1's and conv2's outputs of every kept branch.
A branch pruned to zero channels disappears: a first unit keeps BN1 and its projection (b becomes False),
an identity unit becomes the identity. Call :meth:`PreActResNet.compact_blocks` after removing an identity
unit in the middle of a stage, so that the module names match a model rebuilt from ``cfg``.

Every unit's residual output goes through :meth:`PreActBottleneck.residual`, the one place where SSS's
block factor lambda_b multiplies it (``out = shortcut + lambda_b * F``, docs/paper-settings.md §7.2). ``gates=True``
gives
every unit that keeps a branch such a factor (a :class:`~lit_prune.core.gates.BlockGate` named ``gate``,
initialised to 1; no BN follows conv3, so lambda_b folds into conv3's weight). Off by default.

Init (docs/paper-settings.md §1.5): conv He fan-out, BN gamma 1 / beta 0, Linear PyTorch default. Input 3x224x224.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core import init
from lit_prune.core.gates import BlockGate
from lit_prune.core.groups import ChannelGroup
from lit_prune.models.base import ResidualBlock, ZooModel
from lit_prune.models.registry import register_model, register_width_config

_LAYERS = (3, 4, 6, 3)
_PLANES = (64, 128, 256, 512)
_EXPANSION = 4
_FULL_CFG = [[n, True] for n in _LAYERS]


class PreActBottleneck(ResidualBlock):
    """Pre-activation bottleneck unit (see the module docstring).

    Args:
        in_planes: width of the incoming stream.
        planes: inner width of the unpruned unit; the output is ``4 * planes``.
        stride: stride of the 3x3 conv and of the projection.
        projection: give the unit a 1x1 projection shortcut (a stage's first unit).
        widths: ``(conv1 out, conv2 out)``, or None for no residual branch.
        gate: give the branch SSS's block factor lambda_b (only when there is a branch).

    Without a branch, ``conv1 .. conv3`` and ``gate`` (and ``bn1`` when there is no projection) are None,
    exactly as surgery leaves a unit whose branch it removed.
    """

    #: the residual branch's submodules (``bn1`` belongs to it only when no projection reads it)
    BRANCH = ("conv1", "bn2", "conv2", "bn3", "conv3")
    #: the module whose output an SSS gate scales (lit_prune.core.gates.fold_gates_ folds lambda_b into it)
    gate_folds_into = "conv3"
    branch_end, branch_end_bn = "conv3", None  # pre-activation: conv3's output is added as it is

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        projection: bool,
        widths: Sequence[int] | None,
        gate: bool = False,
    ) -> None:
        super().__init__()
        self.bn1: nn.BatchNorm2d | None = nn.BatchNorm2d(in_planes)
        for name in self.BRANCH:
            setattr(self, name, None)
        self.gate: BlockGate | None = None
        if widths is not None:
            w1, w2 = widths
            self.conv1 = nn.Conv2d(in_planes, w1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(w1)
            self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(w2)
            self.conv3 = nn.Conv2d(w2, planes * _EXPANSION, 1, bias=False)
            if gate:
                self.gate = BlockGate()
        # a plain conv (not a Sequential) so that surgery sees it by name; no BN after it, as in MXNet
        self.downsample = nn.Conv2d(in_planes, planes * _EXPANSION, 1, stride, bias=False) if projection else None

    @property
    def has_branch(self) -> bool:
        return self.conv1 is not None

    def widths(self) -> list[int]:
        """Current ``[conv1 out, conv2 out]`` (``[0, 0]`` without a branch)."""
        return [self.conv1.out_channels, self.conv2.out_channels] if self.has_branch else [0, 0]

    def branch_modules(self) -> tuple[str, ...]:
        """Names of the submodules that go when the residual branch is removed (its gate included)."""
        names = self.BRANCH + (("gate",) if self.gate is not None else ())
        return names if self.downsample is not None else ("bn1", *names)

    def residual(self, act: torch.Tensor) -> torch.Tensor:
        """The residual branch F on the pre-activated input: (N, in, H, W) -> (N, 4 planes, H/s, W/s).

        With a gate, SSS's block factor lambda_b multiplies it here, before the addition to the shortcut.
        """
        out = self.conv1(act)  # (N, w1, H, W)
        out = self.conv2(F.relu(self.bn2(out)))  # (N, w2, H/s, W/s)
        out = self.conv3(F.relu(self.bn3(out)))  # (N, 4 planes, H/s, W/s)
        return out if self.gate is None else self.gate(out)

    def shortcut_output(self, x: torch.Tensor) -> torch.Tensor:
        # the projection reads the pre-activated input
        return x if self.downsample is None else self.downsample(F.relu(self.bn1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn1 is None:  # an identity unit whose branch was removed
            return x
        act = F.relu(self.bn1(x))  # (N, in_planes, H, W)
        shortcut = x if self.downsample is None else self.downsample(act)  # projection reads the activation
        if not self.has_branch:
            return shortcut
        return shortcut + self.residual(act)


def _is_width_pairs(widths: Any, n: int) -> bool:
    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def pair(w: Any) -> bool:
        return isinstance(w, Sequence) and not isinstance(w, (str, bytes)) and len(w) == 2 and all(map(positive, w))

    return isinstance(widths, Sequence) and not isinstance(widths, (str, bytes)) and len(widths) == n and all(
        map(pair, widths)
    )


def _check_cfg(cfg: Any) -> list[list[Any]]:
    """Validate ``cfg`` (see the module docstring); returns it as ``[[a, b], ...]`` lists."""
    expected = "4 [a, b] pairs (a = units keeping their residual branch, b = the first unit keeps its branch)"
    if isinstance(cfg, (str, bytes)) or not isinstance(cfg, Sequence) or len(cfg) != len(_LAYERS):
        raise ValueError(f"SSS ResNet-50 needs cfg of {expected}, e.g. [[0, false], [4, true], [6, true], "
                         f"[3, true]] for ResNet-41; got {cfg!r}")
    out = []
    for s, (entry, n) in enumerate(zip(cfg, _LAYERS, strict=True)):
        ok = isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) == 2
        if ok:
            a, b = entry
            ok = isinstance(a, int) and not isinstance(a, bool) and isinstance(b, bool)
        if not ok:
            raise ValueError(f"SSS ResNet-50 cfg entry {s} must be a pair [int, bool], got {entry!r}")
        lo, hi = (1, n) if b else (0, n - 1)
        if not lo <= a <= hi:
            raise ValueError(
                f"SSS ResNet-50 stage {s + 1} has {n} units: with b={b} the number of units keeping a residual "
                f"branch (counting the first one only when b is True) must lie in [{lo}, {hi}], got {a}"
            )
        out.append([a, b])
    return out


class PreActResNet(ZooModel):
    """MXNet-style pre-activation ResNet-50 with whole residual units removable per stage (SSS).

    Args:
        cfg: one ``[a, b]`` pair per stage (see the module docstring); None for the full ResNet-50.
        num_classes: FC outputs.
        widths: ``[conv1 out, conv2 out]`` per unit keeping a branch, in order; None for the full widths.
        gates: give every residual branch SSS's block factor lambda_b (see the module docstring).

    Raises:
        ValueError: a ``cfg`` that is not 4 valid pairs, or ``widths`` of the wrong length or type.
    """

    input_size = (3, 224, 224)

    def __init__(
        self,
        cfg: Sequence[Sequence[Any]] | None = None,
        num_classes: int = 1000,
        widths: Sequence[Any] | None = None,
        gates: bool = False,
    ) -> None:
        super().__init__()
        cfg = _check_cfg(_FULL_CFG if cfg is None else cfg)
        kept = sum(a for a, _ in cfg)
        if widths is None:
            widths = [[p, p] for (a, _), p in zip(cfg, _PLANES, strict=True) for _ in range(a)]
        if not _is_width_pairs(widths, kept):
            raise ValueError(
                f"SSS ResNet-50 with cfg {cfg} has {kept} residual branches, so widths needs {kept} "
                f"[conv1, conv2] pairs of positive ints (or None for the full widths); got {widths!r}"
            )
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes, i = 64, 0
        for s, ((a, b), planes) in enumerate(zip(cfg, _PLANES, strict=True)):
            first = list(widths[i]) if b else None
            i += int(b)
            units = [PreActBottleneck(in_planes, planes, 1 if s == 0 else 2, True, first, gates)]
            in_planes = planes * _EXPANSION
            for _ in range(a - int(b)):
                units.append(PreActBottleneck(in_planes, planes, 1, False, list(widths[i]), gates))
                i += 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*units))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 2048, H/32, W/32)
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)  # (N, 2048, 1, 1)
        return self.fc(torch.flatten(x, 1))

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> list[PreActBottleneck]:
        """All units in forward order."""
        return [u for stage in self.stages() for u in stage]

    def depth(self) -> int:
        """The paper's depth: 2 + 3 x (units keeping a residual branch); projection convs are not counted."""
        return 2 + 3 * sum(u.has_branch for u in self.blocks())

    def compact_blocks(self) -> None:
        """Drop identity units whose branch was removed, so module names follow ``cfg`` again.

        Such a unit has no parameters and computes the identity: outputs do not change, only the indices of
        the later units of its stage (and hence their state-dict keys).
        """
        for s, stage in enumerate(self.stages()):
            units = [u for j, u in enumerate(stage) if j == 0 or u.has_branch]
            if len(units) != len(stage):
                setattr(self, f"layer{s + 1}", nn.Sequential(*units))

    def arch_kwargs(self) -> dict[str, Any]:
        cfg, widths = [], []
        for s, stage in enumerate(self.stages()):
            flags = [u.has_branch for u in stage]
            if any(cur and not prev for prev, cur in zip(flags[1:], flags[2:])):
                # a removed unit has no state, but the kept units after it would be renumbered by a rebuild
                raise ValueError(
                    f"layer{s + 1} has an identity unit without residual branch before a kept one; call "
                    "model.compact_blocks() after removing units so that cfg describes the module names"
                )
            cfg.append([sum(flags), flags[0]])
            widths += [u.widths() for u in stage if u.has_branch]
        full = [[p, p] for (a, _), p in zip(cfg, _PLANES, strict=True) for _ in range(a)]
        kwargs: dict[str, Any] = {"cfg": cfg} if widths == full else {"cfg": cfg, "widths": widths}
        if any(u.gate is not None for u in self.blocks()):
            kwargs["gates"] = True
        return kwargs

    def channel_groups(self) -> list[ChannelGroup]:
        # conv1's and conv2's outputs of every kept branch; conv3 and the projection feed the addition and are
        # never cut. Pruning a group to zero removes the branch (a first unit keeps BN1 and its projection).
        groups = []
        for s, stage in enumerate(self.stages()):
            for j, unit in enumerate(stage):
                if not unit.has_branch:
                    continue
                p = f"layer{s + 1}.{j}"
                branch = tuple(f"{p}.{m}" for m in unit.branch_modules())
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
        return groups

    def reset_parameters(self) -> None:
        init.he_bn_init_(self, 1.0)  # docs/paper-settings.md §1.5
        self.fc.reset_parameters()


@register_model("sss_resnet50")
def sss_resnet50(
    cfg: Sequence[Sequence[Any]] | None = None,
    num_classes: int = 1000,
    widths: Sequence[Any] | None = None,
    gates: bool = False,
) -> PreActResNet:
    """SSS's pre-activation ResNet-50; ``cfg`` = ``[a, b]`` per stage (named "resnet41", "resnet32", "resnet26").

    ``gates=True`` adds the block factors that ``callbacks.SparseStructureSelection`` trains.
    """
    return PreActResNet(cfg, num_classes, widths, gates)


# The paper's SSS architectures (docs/paper-settings.md §2.7, Table 5): depth 2 + 3 * sum(a).
register_width_config("sss_resnet50", "resnet41", [[0, False], [4, True], [6, True], [3, True]])
register_width_config("sss_resnet50", "resnet32", [[1, False], [4, True], [4, True], [1, True]])
register_width_config("sss_resnet50", "resnet26", [[0, False], [2, False], [5, False], [1, True]])
