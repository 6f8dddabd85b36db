"""VGG networks of the paper: three CIFAR families and the ImageNet VGG-11-BN / VGG-16 (docs/paper-settings.md §2.1,
2.7).

Width config ``cfg``: a list read left to right, an int ``w`` is a 3x3 / pad 1 conv with ``w`` output
channels (followed by its BatchNorm where the model has one, then ReLU) and ``"M"`` is a 2x2 / stride 2
max-pool. The number of convs is fixed by the model's depth (13 for every VGG-16); pruning changes widths
only. ``slim_vgg11_bn`` appends its two hidden FC widths to the list, as the reference code does:
``[64, "M", ..., 512, 512, "M", 4096, 4096]``.

Families and their registered names:

* ``cifar_vgg{11,13,16,19}``: L1-norm filter pruning (docs/paper-settings.md §2.1a). Conv bias False + BN2d + ReLU,
  4 pools (2x2 features at the end), 2x2 average pool, classifier Linear(cfg[-1], 512) - BN1d - ReLU -
  Linear(512, C). Init: conv He fan-out, BN gamma 0.5 (BN2d and BN1d), Linear N(0, 0.01).
  Named width config ``"A"`` of ``cifar_vgg16`` is VGG-16-A (docs/paper-settings.md §3.2).
* ``slim_vgg{11,13,16,19}``: Network Slimming (2.1b). Same features, a single Linear(cfg[-1], C);
  BN gamma 0.5.
* ``bearpaw_vgg{16,19}_bn``: weight-level pruning and the weight-level lottery ticket (2.1c). Conv bias
  True (zero init), He *fan-in*, BN gamma 1, Linear N(0, 0.01).
  Decision on the pooling: upstream bearpaw VGGs end with a 5th max-pool, but the copy the paper ran
  (``REPO:cifar/weight-level/models/cifar/vgg.py``) uses configs D/E with **4** pools and an AvgPool2d(2)
  in ``forward``, and docs/paper-settings.md §2.1c says the same ("AvgPool2d(2)", "same lists as above"). We follow
  that copy; both give 1x1x512 before the Linear(512, C) and identical conv/linear MACs.
* ``slim_vgg11_bn``: ImageNet VGG-11-BN of Network Slimming (2.7). Conv bias True + BN2d + ReLU;
  classifier Linear(c*7*7, f1) - BN1d - ReLU - Linear(f1, f2) - BN1d - ReLU - Linear(f2, C), no dropout;
  He fan-out, BN gamma 0.5, Linear N(0, 0.01).
* ``vgg16`` / ``vgg16_bn``: official VGG-16 (ThiNet, regression pruning, weight-level ImageNet), with
  torchvision's exact module layout (``features.N``, ``avgpool``, ``classifier.N``), so
  ``model.load_state_dict(torchvision.models.vgg16_bn().state_dict())`` works at full width.
  Named width configs: ``"thinet_conv"`` (ThiNet VGG-Conv) and ``"5x"`` (He et al.'s VGG-16-5x).
* ``vgg16_gap``: ThiNet's VGG-GAP / VGG-Tiny head (2.7): no 5th pool, global average pool, a single
  Linear(cfg[-1], C). The reference applies AvgPool2d(14, 2) to the 14x14 map, i.e. a global pool at 224.
  Named width configs ``"thinet_gap"`` and ``"thinet_tiny"``.

All ImageNet models carry an ``avgpool`` module (AdaptiveAvgPool2d(7), or (1) for the GAP head) like
torchvision; at 224x224 with 5 pools it is the identity, so it changes neither outputs nor MACs.
ReLUs are ``nn.ReLU`` modules and never in-place: a forward hook on a conv or BN (ThiNet, regression
pruning) must see its output, not the output overwritten by the following ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core import init
from lit_prune.core.groups import ChannelGroup
from lit_prune.models.base import ZooModel
from lit_prune.models.registry import register_model, register_width_config

M = "M"

# Default (unpruned) CIFAR configs of the L1-norm and slimming code, by depth: 4 pools only.
_CIFAR_CFGS: dict[int, list[int | str]] = {
    11: [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512],
    13: [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512],
    16: [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512],
    19: [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512],
}
# Official ImageNet VGG-16 (torchvision "D"): 5 pools, 7x7 features at 224.
_VGG16_CFG: list[int | str] = [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M]
# ImageNet VGG-11-BN of Network Slimming: conv widths, then the two hidden FC widths.
_SLIM_VGG11_CFG: list[int | str] = [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M, 4096, 4096]
# VGG-16 without its 5th pool, for the global-average-pool head.
_VGG16_GAP_CFG: list[int | str] = _VGG16_CFG[:-1]

# Properties of the three CIFAR families (docs/paper-settings.md §2.1 and 1.5).
_CIFAR_STYLES: dict[str, dict[str, Any]] = {
    "l1": {"bias": False, "head": "mlp", "gamma": 0.5, "conv_init": init.he_fan_out_},
    "slimming": {"bias": False, "head": "linear", "gamma": 0.5, "conv_init": init.he_fan_out_},
    "bearpaw": {"bias": True, "head": "linear", "gamma": 1.0, "conv_init": init.he_fan_in_},
}


def _as_list(cfg: Any, what: str) -> list[Any]:
    if isinstance(cfg, (str, bytes)) or not isinstance(cfg, Sequence) or len(cfg) == 0:
        raise ValueError(
            f"{what} needs cfg as a non-empty list of conv widths (positive ints) and 'M' (max-pool), "
            f"got {cfg!r}"
        )
    return list(cfg)


def _check_cfg(cfg: Any, num_convs: int, what: str) -> list[int | str]:
    """Validate a conv cfg (ints and ``"M"``) with ``num_convs`` convs; return it as a new list."""
    cfg = _as_list(cfg, what)
    for i, v in enumerate(cfg):
        if v == M:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(
                f"{what}: cfg[{i}] = {v!r} is neither a conv width (positive int) nor 'M' (2x2 max-pool)"
            )
        if v <= 0:
            raise ValueError(
                f"{what}: cfg[{i}] = {v} is not a positive conv width; a VGG layer cannot be pruned to "
                "zero channels"
            )
    n = sum(1 for v in cfg if v != M)
    if n != num_convs:
        raise ValueError(
            f"{what} needs cfg with exactly {num_convs} conv widths (plus 'M' pools), got {n}: {cfg}"
        )
    return cfg


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _last_width(cfg: Sequence[int | str]) -> int:
    return next(v for v in reversed(cfg) if v != M)


def _make_features(cfg: Sequence[int | str], batch_norm: bool, bias: bool) -> nn.Sequential:
    """The shared VGG feature extractor; layer indices match torchvision's ``make_layers``.

    Each int ``w`` becomes Conv2d(c, w, 3, padding=1) [, BatchNorm2d(w)], ReLU; each ``"M"`` a 2x2 / stride 2
    max-pool. (N, 3, H, W) -> (N, last width, H / 2**#pools, W / 2**#pools).
    """
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == M:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(c, v, kernel_size=3, padding=1, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        c = v
    return nn.Sequential(*layers)


def _features_cfg(features: nn.Sequential) -> list[int | str]:
    """Read the cfg back from the current module shapes (conv ``out_channels``, pools as ``"M"``)."""
    cfg: list[int | str] = []
    for m in features:
        if isinstance(m, nn.Conv2d):
            cfg.append(m.out_channels)
        elif isinstance(m, nn.MaxPool2d):
            cfg.append(M)
    return cfg


def _conv_groups(features: nn.Sequential, head_consumer: str) -> list[ChannelGroup]:
    """One prunable group per conv: its filters and BN, read by the next conv or the first Linear.

    The last conv's group is read by ``head_consumer``; surgery slices that Linear's columns, one per
    channel after a 1x1 map (CIFAR, GAP head) or 7*7 per channel after the ImageNet flatten.
    """
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    groups = []
    for i, nxt in zip(convs, [*convs[1:], None], strict=True):
        conv = f"features.{i}"
        bn = f"features.{i + 1}" if isinstance(features[i + 1], nn.BatchNorm2d) else None
        groups.append(
            ChannelGroup(
                name=conv,
                producers=(conv,) if bn is None else (conv, bn),
                consumers=(head_consumer if nxt is None else f"features.{nxt}",),
                bn=bn,
                conv=conv,
            )
        )
    return groups


class CifarVGG(ZooModel):
    """VGG for 32x32 inputs, in the L1-norm, slimming or bearpaw style (docs/paper-settings.md §2.1).

    Args:
        depth: 11, 13, 16 or 19 (8, 10, 13 or 16 convs).
        num_classes: classifier outputs.
        cfg: conv widths with exactly 4 ``"M"`` pools and a conv last; None for the unpruned default.
        style: ``"l1"`` (2.1a), ``"slimming"`` (2.1b) or ``"bearpaw"`` (2.1c).

    Raises:
        ValueError: for an unknown depth or style, or a cfg that does not fit (see the module docstring).
    """

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 10,
        cfg: Sequence[int | str] | None = None,
        style: str = "l1",
    ) -> None:
        super().__init__()
        if depth not in _CIFAR_CFGS:
            raise ValueError(f"CIFAR VGG depth must be one of {sorted(_CIFAR_CFGS)}, got {depth!r}")
        if style not in _CIFAR_STYLES:
            raise ValueError(f"CIFAR VGG style must be one of {sorted(_CIFAR_STYLES)}, got {style!r}")
        _check_num_classes(num_classes)
        what = f"CIFAR VGG-{depth}"
        default = _CIFAR_CFGS[depth]
        cfg = _check_cfg(default if cfg is None else cfg, sum(1 for v in default if v != M), what)
        # 32 -> 2 after 4 pools, then the 2x2 average pool leaves one position: the flattened vector has
        # exactly cfg[-1] entries only with 4 pools and a conv last.
        if cfg.count(M) != 4 or cfg[-1] == M:
            raise ValueError(
                f"{what} needs cfg with exactly 4 'M' pools and a conv width last (32x32 -> 2x2 features), "
                f"got {cfg}"
            )
        self.depth, self.style = depth, style
        props = _CIFAR_STYLES[style]
        self.features = _make_features(cfg, batch_norm=True, bias=props["bias"])
        if props["head"] == "mlp":
            self.classifier = nn.Sequential(
                nn.Linear(cfg[-1], 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_classes)
            )
        else:
            self.classifier = nn.Sequential(nn.Linear(cfg[-1], num_classes))
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 3, 32, 32) -> (N, cfg[-1], 2, 2)
        # functional pool, as the reference instantiates it inside forward (not a counted module)
        x = torch.flatten(F.avg_pool2d(x, 2), 1)  # (N, cfg[-1])
        return self.classifier(x)

    def arch_kwargs(self) -> dict[str, Any]:
        return {"cfg": _features_cfg(self.features)}

    def channel_groups(self) -> list[ChannelGroup]:
        # Every conv is prunable (L1-norm, slimming). The L1 head's hidden 512 units are not part of the
        # cfg and never pruned by the paper, so they are not a group.
        return _conv_groups(self.features, "classifier.0")

    def reset_parameters(self) -> None:
        props = _CIFAR_STYLES[self.style]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                props["conv_init"](m)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                init.bn_(m, props["gamma"])
            elif isinstance(m, nn.Linear):
                init.linear_normal_(m, 0.01)


class ImageNetVGG(ZooModel):
    """VGG for 224x224 inputs with torchvision's module layout (docs/paper-settings.md §2.7).

    Args:
        num_convs: number of convs the cfg must have (8 for VGG-11, 13 for VGG-16).
        num_classes: classifier outputs.
        cfg: conv widths and ``"M"`` pools; for ``head="bn"`` followed by the two hidden FC widths.
        batch_norm: BatchNorm2d after every conv (conv bias stays True, as in torchvision and the reference).
        head: ``"dropout"`` (official: Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear on 7x7 features),
            ``"bn"`` (slimming: Linear-BN1d-ReLU-Linear-BN1d-ReLU-Linear on 7x7 features, widths in cfg)
            or ``"gap"`` (global average pool, one Linear).
        fc_widths: the two hidden FC widths of the ``"dropout"`` head (default 4096, 4096).
        dropout: dropout probability of the ``"dropout"`` head.
        bn_gamma: initial BatchNorm weight (0.5 in the slimming model, else 1).
        name: model name used in error messages.

    Raises:
        ValueError: for a cfg or fc_widths that does not fit.
    """

    input_size = (3, 224, 224)

    def __init__(
        self,
        num_convs: int,
        num_classes: int = 1000,
        cfg: Sequence[int | str] | None = None,
        *,
        default_cfg: Sequence[int | str],
        batch_norm: bool,
        head: str,
        fc_widths: Sequence[int] | None = None,
        dropout: float = 0.5,
        bn_gamma: float = 1.0,
        name: str = "VGG",
    ) -> None:
        super().__init__()
        if head not in ("dropout", "bn", "gap"):
            raise ValueError(f"VGG head must be 'dropout', 'bn' or 'gap', got {head!r}")
        _check_num_classes(num_classes)
        cfg = _as_list(default_cfg if cfg is None else cfg, name)
        if head == "bn":
            # the reference's format: conv part, then the two hidden FC widths
            if len(cfg) < 3 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in cfg[-2:]):
                raise ValueError(
                    f"{name} needs cfg = conv widths and 'M' pools followed by the two hidden FC widths "
                    f"(positive ints), e.g. [64, 'M', ..., 512, 'M', 4096, 4096]; got {cfg}"
                )
            cfg, fc_widths = cfg[:-2], cfg[-2:]
        elif head == "dropout":
            fc_widths = [4096, 4096] if fc_widths is None else fc_widths
            if (
                isinstance(fc_widths, (str, bytes))
                or not isinstance(fc_widths, Sequence)
                or len(fc_widths) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in fc_widths)
            ):
                raise ValueError(f"{name} needs fc_widths as two positive ints, got {fc_widths!r}")
        elif fc_widths is not None:
            raise ValueError(f"{name} has a single Linear after global pooling; fc_widths must be None")
        cfg = _check_cfg(cfg, num_convs, name)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.head, self.bn_gamma, self.dropout = head, bn_gamma, dropout
        self.features = _make_features(cfg, batch_norm=batch_norm, bias=True)
        c = _last_width(cfg)
        if head == "gap":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(c, num_classes))
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = self._fc_head(c * 7 * 7, *fc_widths, num_classes)
        self.reset_parameters()

    def _fc_head(self, in_features: int, f1: int, f2: int, num_classes: int) -> nn.Sequential:
        # (N, c*7*7) -> f1 -> f2 -> num_classes; the Linears sit at indices 0, 3, 6, as in torchvision
        if self.head == "dropout":
            return nn.Sequential(
                nn.Linear(in_features, f1), nn.ReLU(), nn.Dropout(self.dropout),
                nn.Linear(f1, f2), nn.ReLU(), nn.Dropout(self.dropout),
                nn.Linear(f2, num_classes),
            )  # fmt: skip
        return nn.Sequential(
            nn.Linear(in_features, f1), nn.BatchNorm1d(f1), nn.ReLU(),
            nn.Linear(f1, f2), nn.BatchNorm1d(f2), nn.ReLU(),
            nn.Linear(f2, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))  # (N, 3, 224, 224) -> (N, c, 7, 7), or (N, c, 1, 1) for "gap"
        return self.classifier(torch.flatten(x, 1))

    def fc_widths(self) -> list[int]:
        """Current hidden FC widths ([] for the global-pool head)."""
        return [m.out_features for m in self.classifier if isinstance(m, nn.Linear)][:-1]

    def arch_kwargs(self) -> dict[str, Any]:
        cfg = _features_cfg(self.features)
        if self.head == "bn":
            return {"cfg": cfg + self.fc_widths()}
        if self.head == "dropout":
            return {"cfg": cfg, "fc_widths": self.fc_widths()}
        return {"cfg": cfg}

    def channel_groups(self) -> list[ChannelGroup]:
        groups = _conv_groups(self.features, "classifier.0")
        if self.head == "bn":
            # Slimming also prunes the hidden FC units through their BN1d gammas (widths are in cfg).
            # The official head's FCs are never pruned in the paper and have no BN to score: no group.
            for lin, bn, nxt in (("0", "1", "3"), ("3", "4", "6")):
                groups.append(
                    ChannelGroup(
                        name=f"classifier.{lin}",
                        producers=(f"classifier.{lin}", f"classifier.{bn}"),
                        consumers=(f"classifier.{nxt}",),
                        bn=f"classifier.{bn}",
                    )
                )
        return groups

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init.he_fan_out_(m)  # = kaiming_normal_(mode="fan_out"), zero bias
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                init.bn_(m, self.bn_gamma)
            elif isinstance(m, nn.Linear):
                init.linear_normal_(m, 0.01)


# ----------------------------------------------------------------------------------------- builders


def _cifar_builder(depth: int, style: str, doc: str):
    def build(cfg: Sequence[int | str] | None = None, num_classes: int = 10) -> CifarVGG:
        return CifarVGG(depth, num_classes, cfg, style)

    build.__doc__ = doc
    return build


for _depth in (11, 13, 16, 19):
    register_model(f"cifar_vgg{_depth}")(
        _cifar_builder(_depth, "l1", f"CIFAR VGG-{_depth} of the L1-norm code (BN1d MLP classifier).")
    )
    register_model(f"slim_vgg{_depth}")(
        _cifar_builder(_depth, "slimming", f"CIFAR VGG-{_depth} of the Network Slimming code (one Linear).")
    )
for _depth in (16, 19):
    register_model(f"bearpaw_vgg{_depth}_bn")(
        _cifar_builder(_depth, "bearpaw", f"bearpaw CIFAR VGG-{_depth}-BN (weight-level pruning, LT).")
    )


@register_model("slim_vgg11_bn")
def slim_vgg11_bn(cfg: Sequence[int | str] | None = None, num_classes: int = 1000) -> ImageNetVGG:
    """ImageNet VGG-11-BN of Network Slimming; cfg = conv widths with 'M', then the two FC widths."""
    return ImageNetVGG(
        8, num_classes, cfg, default_cfg=_SLIM_VGG11_CFG, batch_norm=True, head="bn", bn_gamma=0.5,
        name="slim_vgg11_bn",
    )  # fmt: skip


@register_model("vgg16")
def vgg16(
    cfg: Sequence[int | str] | None = None,
    num_classes: int = 1000,
    fc_widths: Sequence[int] | None = None,
    dropout: float = 0.5,
) -> ImageNetVGG:
    """Official VGG-16 without BN, torchvision layout (ThiNet, regression and weight-level pruning)."""
    return ImageNetVGG(
        13, num_classes, cfg, default_cfg=_VGG16_CFG, batch_norm=False, head="dropout",
        fc_widths=fc_widths, dropout=dropout, name="vgg16",
    )  # fmt: skip


@register_model("vgg16_bn")
def vgg16_bn(
    cfg: Sequence[int | str] | None = None,
    num_classes: int = 1000,
    fc_widths: Sequence[int] | None = None,
    dropout: float = 0.5,
) -> ImageNetVGG:
    """VGG-16 with BN2d after every conv, torchvision layout."""
    return ImageNetVGG(
        13, num_classes, cfg, default_cfg=_VGG16_CFG, batch_norm=True, head="dropout",
        fc_widths=fc_widths, dropout=dropout, name="vgg16_bn",
    )  # fmt: skip


@register_model("vgg16_gap")
def vgg16_gap(cfg: Sequence[int | str] | None = None, num_classes: int = 1000) -> ImageNetVGG:
    """VGG-16 convs (no BN) with a global-average-pool head: ThiNet's VGG-GAP and VGG-Tiny."""
    return ImageNetVGG(
        13, num_classes, cfg, default_cfg=_VGG16_GAP_CFG, batch_norm=False, head="gap", name="vgg16_gap"
    )


# The paper's predefined pruned architectures (docs/paper-settings.md §3.2 and 2.7).
register_width_config(
    "cifar_vgg16", "A", [32, 64, M, 128, 128, M, 256, 256, 256, M, 256, 256, 256, M, 256, 256, 256]
)
register_width_config(
    "vgg16", "thinet_conv", [32, 32, M, 64, 64, M, 128, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M]
)
register_width_config(
    "vgg16", "5x", [24, 22, M, 41, 51, M, 108, 89, 111, M, 184, 276, 228, M, 512, 512, 512, M]
)
register_width_config(
    "vgg16_gap", "thinet_gap", [32, 32, M, 64, 64, M, 128, 128, 128, M, 256, 256, 256, M, 512, 512, 512]
)
register_width_config(
    "vgg16_gap", "thinet_tiny", [16, 16, M, 32, 32, M, 64, 64, 64, M, 128, 128, 128, M, 128, 128, 256]
)
