"""CIFAR ResNet-20/32/56/110 (depth 6n+2) of L1-norm pruning and Soft Filter Pruning.

Width config ``cfg``: one int per block, the output width of the block's first conv (the only width
L1-norm pruning changes; docs/paper-settings.md §2.2). A width of 0 removes the block's residual branch: the block
becomes its shortcut.

Two parameter-free shortcuts, used where a stage halves the resolution and doubles the width:

* ``"avgpool"`` (L1-norm code, ``cifar_resnet*``): 2x2 average pool, then zero channels. Unlike the
  reference code the gradient flows through it; ``detach_shortcut=True`` reproduces the reference
  (docs/paper-settings.md §12.1).
* ``"subsample"`` (SFP code, ``sfp_resnet*``): stride-2 subsampling, then zero channels.

``gates=True`` gives every block that has a residual branch Sparse Structure Selection's factor lambda_b
(a :class:`~lit_prune.core.gates.BlockGate` named ``gate``, initialised to 1): ``out = relu(shortcut +
lambda_b * bn2(conv2(...)))``. Off by default, so state dicts are those of the ungated model.
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

_STAGE_PLANES = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: spatial downsampling, then zero channels up to ``out_channels``."""

    def __init__(self, out_channels: int, mode: str, detach: bool = False) -> None:
        super().__init__()
        if mode not in ("avgpool", "subsample"):
            raise ValueError(f"shortcut must be 'avgpool' or 'subsample', got {mode!r}")
        self.out_channels, self.mode, self.detach = out_channels, mode, detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, out_channels, H/2, W/2)
        x = F.avg_pool2d(x, 2) if self.mode == "avgpool" else x[:, :, ::2, ::2]
        if self.detach:
            x = x.detach()
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class BasicBlock(ResidualBlock):
    """conv1-bn1-relu-conv2-bn2 (times the gate, if any) + shortcut, relu.

    A removed branch (width 0) leaves conv1..bn2 and the gate None.
    """

    #: the module whose output an SSS gate scales (lit_prune.core.gates.fold_gates_ folds lambda_b into it)
    gate_folds_into = "bn2"

    def __init__(
        self, in_planes: int, width: int, planes: int, stride: int, shortcut: nn.Module | None, gate: bool = False
    ) -> None:
        super().__init__()
        keep = width > 0
        self.conv1 = nn.Conv2d(in_planes, width, 3, stride, 1, bias=False) if keep else None
        self.bn1 = nn.BatchNorm2d(width) if keep else None
        self.conv2 = nn.Conv2d(width, planes, 3, 1, 1, bias=False) if keep else None
        self.bn2 = nn.BatchNorm2d(planes) if keep else None
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.gate = BlockGate() if keep and gate else None

    @property
    def width(self) -> int:
        return 0 if self.conv1 is None else self.conv1.out_channels

    def shortcut_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x)
        if self.conv1 is not None:
            branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (N, planes, H/s, W/s)
            out = out + (branch if self.gate is None else self.gate(branch))
        return F.relu(out)


class CifarResNet(ZooModel):
    """ResNet for 32x32 inputs with parameter-free shortcuts (docs/paper-settings.md §2.2, 2.3); ``gates``: SSS
    factors."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        cfg: Sequence[int] | None = None,
        shortcut: str = "avgpool",
        detach_shortcut: bool = False,
        linear_init: str = "default",
        gates: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        default = [p for p in _STAGE_PLANES for _ in range(n)]
        cfg = list(default if cfg is None else cfg)
        if len(cfg) != 3 * n or any(not isinstance(w, int) or w < 0 for w in cfg):
            raise ValueError(f"ResNet-{depth} needs cfg of {3 * n} non-negative ints (one per block), got {cfg}")
        self.depth, self.shortcut_mode, self.linear_init = depth, shortcut, linear_init
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, widths = 16, iter(cfg)
        for s, planes in enumerate(_STAGE_PLANES):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                sc = ZeroPadShortcut(planes, shortcut, detach_shortcut) if stride == 2 else None
                blocks.append(BasicBlock(in_planes, next(widths), planes, stride, sc, gates))
                in_planes = planes
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def blocks(self) -> list[BasicBlock]:
        return [b for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    def arch_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cfg": [b.width for b in self.blocks()]}
        if any(b.gate is not None for b in self.blocks()):
            kwargs["gates"] = True
        return kwargs

    def channel_groups(self) -> list[ChannelGroup]:
        # Only the first conv of a block is prunable: conv2's outputs meet the shortcut (docs/paper-settings.md §3.3).
        groups = []
        for s in range(1, 4):
            for b, block in enumerate(getattr(self, f"layer{s}")):
                if block.conv1 is None:
                    continue
                p = f"layer{s}.{b}"
                names = ("conv1", "bn1", "conv2", "bn2") + (("gate",) if block.gate is not None else ())
                branch = tuple(f"{p}.{m}" for m in names)
                groups.append(ChannelGroup(
                    name=f"{p}.conv1", producers=(f"{p}.conv1", f"{p}.bn1"), consumers=(f"{p}.conv2",),
                    bn=f"{p}.bn1", conv=f"{p}.conv1", branch=branch,
                ))
        return groups

    def reset_parameters(self) -> None:
        init.he_bn_init_(self, 1.0)  # docs/paper-settings.md §1.5
        if self.linear_init == "kaiming":
            nn.init.kaiming_normal_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
        else:
            self.fc.reset_parameters()


def _l1_resnet(depth: int):
    def build(
        cfg: Sequence[int] | None = None, num_classes: int = 10, detach_shortcut: bool = False, gates: bool = False
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, cfg, shortcut="avgpool", detach_shortcut=detach_shortcut, gates=gates)

    build.__doc__ = f"ResNet-{depth} of the L1-norm code (avg-pool + zero-channel shortcut)."
    return build


def _sfp_resnet(depth: int):
    def build(cfg: Sequence[int] | None = None, num_classes: int = 10, gates: bool = False) -> CifarResNet:
        return CifarResNet(depth, num_classes, cfg, shortcut="subsample", linear_init="kaiming", gates=gates)

    build.__doc__ = f"ResNet-{depth} of the SFP code (strided-subsample + zero-channel shortcut)."
    return build


for _depth in (20, 32, 56, 110):
    register_model(f"cifar_resnet{_depth}")(_l1_resnet(_depth))
    register_model(f"sfp_resnet{_depth}")(_sfp_resnet(_depth))

# The paper's L1-norm targets (docs/paper-settings.md §3.3): first-conv widths per block.
register_width_config("cifar_resnet56", "A", [14] * 7 + [16, 14] + [32] + [28] * 8 + [64] + [57] * 7 + [64])
register_width_config("cifar_resnet56", "B", [6] * 7 + [16, 16] + [32] + [22] * 6 + [32, 22] + [64] + [57] * 7 + [64])
register_width_config("cifar_resnet110", "A", [8] * 17 + [16] + [32] * 18 + [64] * 18)
register_width_config("cifar_resnet110", "B", [8] * 17 + [16] + [32] + [19] * 17 + [64] + [44] * 17)
