"""CIFAR DenseNets: Network Slimming's DenseNet-40 and bearpaw's DenseNets of weight-level pruning
(docs/paper-settings.md §2.5, 2.6, 12.9).

Layout: stem conv3x3(3 -> 2 * growth); three dense blocks of ``n`` layers separated by two transitions;
then BN -> [selection] -> ReLU -> global average pool -> Linear. With ``C`` the width of the concatenated
stream entering it:

* basic dense layer: ``BN1(C) -> [sel] -> ReLU -> conv1 3x3 (-> growth)``;
* bottleneck dense layer (DenseNet-B): ``BN1(C) -> [sel] -> ReLU -> conv1 1x1 (-> 4 * growth) -> BN2 ->
  ReLU -> conv2 3x3 (-> growth)``; each layer's output is concatenated to its input (C -> C + growth);
* transition: ``BN1(C) -> [sel] -> ReLU -> conv1 1x1 (-> floor(compression * C)) -> 2x2 avg-pool``.

Depth counts the convs plus the classifier: ``3n + 4`` with basic layers, ``6n + 4`` with bottlenecks.
Registered sizes:

* ``slim_densenet40`` (Network Slimming): depth 40, growth 12, basic, compression 1, a selection after
  every stream BN, BN gamma 0.5. Stream widths 24 -> 168 | 168 -> 312 | 312 -> 456.
* ``densenet40`` (weight-level pruning, bearpaw ``--depth 40``): the same without selections, BN gamma 1.
* ``densenet_c100``: what the reference code's "DenseNet-BC-100" command really builds (docs/paper-settings.md §12.9):
  32 *basic* layers per block, compression 0.5, growth 12. This is the model behind the paper's Table 6.
* ``densenet_bc100``: a true DenseNet-BC-100: 16 bottleneck layers per block, compression 0.5, growth 12
  (~0.8M parameters). Not what the paper ran.

Width config ``cfg``: the input width of every conv and of the classifier after the stem, in forward order.
A basic layer contributes one int (what conv1 reads), a bottleneck layer two (what conv1 reads, then
conv2's input = conv1's output width), a transition one, the classifier one. So DenseNet-40 has
``3 * 12 + 3 = 39`` entries::

    [24, 36, ..., 156,  168,  168, 180, ..., 300,  312,  312, 324, ..., 444,  456]
     block-1 layers     trans  block-2 layers      trans  block-3 layers      final

Concatenation widths and conv *outputs* never change under pruning (growth stays, transitions output
``floor(compression * C)`` of the full stream width): Network Slimming prunes only what each conv reads,
through a channel selection after the BN (docs/paper-settings.md §6.2). The entries that read the stream must
therefore equal the stream width, or the number of channels the selection keeps; the bottleneck widths
are free. A zero width is refused (a dense layer cannot be removed without changing the stream).

Channel selections (``slim_*``), kwarg ``select``: one entry per stream-reading position in forward order
(every dense layer, every transition, the classifier: ``3n + 3`` entries). An entry is a strictly
increasing list of kept stream channels, or None to keep all; ``select=None`` keeps all everywhere.

Prunable channel groups (:meth:`DenseNet.channel_groups`): every selection (slim only, scored by the BN
before it; 39 for DenseNet-40, one per ``cfg`` entry) and every bottleneck width. A model without
selections and bottlenecks (``densenet40``, ``densenet_c100``) has none: it is pruned by weight masks.

Init (docs/paper-settings.md §1.5): conv He fan-out; BN gamma 0.5 (slimming) or 1 (bearpaw), beta 0; Linear default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_prune.core import init
from lit_prune.core.groups import ChannelGroup
from lit_prune.models.base import ChannelSelection, ZooModel, check_select
from lit_prune.models.registry import register_model


class _StreamReader(nn.Module):
    """Pre-activation head shared by dense layers and transitions: BN1 -> [selection] -> ReLU."""

    def _head(self, in_planes: int, selection: bool, indices: Sequence[int] | None) -> None:
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.select = ChannelSelection(in_planes, indices) if selection else None

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, reads, H, W)
        out = self.bn1(x)
        if self.select is not None:
            out = self.select(out)
        return F.relu(out)


class DenseLayer(_StreamReader):
    """One dense layer; ``width`` = [reads] (basic) or [reads, bottleneck width] (bottleneck)."""

    def __init__(
        self,
        in_planes: int,
        width: Sequence[int],
        growth: int,
        selection: bool,
        indices: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self._head(in_planes, selection, indices)
        self.bottleneck = len(width) == 2
        if self.bottleneck:
            self.conv1 = nn.Conv2d(width[0], width[1], 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width[1])
            self.conv2 = nn.Conv2d(width[1], growth, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(width[0], growth, 3, 1, 1, bias=False)

    def width(self) -> list[int]:
        return [self.conv1.in_channels] + ([self.conv1.out_channels] if self.bottleneck else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self._read(x))
        if self.bottleneck:
            out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)  # (N, C, H, W) -> (N, C + growth, H, W)


class Transition(_StreamReader):
    """BN1 -> [selection] -> ReLU -> conv1 1x1 -> 2x2 average pool (functional, not counted as a layer)."""

    def __init__(
        self, in_planes: int, reads: int, out_planes: int, selection: bool, indices: Sequence[int] | None
    ) -> None:
        super().__init__()
        self._head(in_planes, selection, indices)
        self.conv1 = nn.Conv2d(reads, out_planes, 1, bias=False)

    def width(self) -> list[int]:
        return [self.conv1.in_channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv1(self._read(x)), 2)  # (N, C, H, W) -> (N, out_planes, H/2, W/2)


class DenseNet(ZooModel):
    """DenseNet for 32x32 inputs (see the module docstring for ``cfg`` and ``select``).

    Args:
        depth: 3n+4 (basic layers) or 6n+4 (bottleneck layers), ``n`` layers per dense block.
        num_classes: classifier outputs.
        cfg: width config, None for the unpruned widths.
        select: kept stream channels per stream-reading position (needs ``channel_selection``), None = all.
        growth: channels each dense layer adds.
        bottleneck: DenseNet-B layers (1x1 conv to 4 * growth before the 3x3 conv).
        compression: fraction of channels a transition keeps (DenseNet's theta, bearpaw's 1/compressionRate).
        channel_selection: put a :class:`ChannelSelection` after every BN that reads the stream.
        bn_gamma: initial BN weight (0.5 for slimming, 1 for bearpaw).

    Raises:
        ValueError: on an impossible depth, growth or compression, or a ``cfg``/``select`` of the wrong
            length, with zero widths, or inconsistent with each other or with the stream widths.
    """

    def __init__(
        self,
        depth: int = 40,
        num_classes: int = 10,
        cfg: Sequence[int] | None = None,
        select: Sequence[Sequence[int] | None] | None = None,
        growth: int = 12,
        bottleneck: bool = False,
        compression: float = 1.0,
        channel_selection: bool = True,
        bn_gamma: float = 0.5,
    ) -> None:
        super().__init__()
        per_layer = 6 if bottleneck else 3
        if depth < per_layer + 4 or (depth - 4) % per_layer:
            kind = "6n+4 with bottleneck layers" if bottleneck else "3n+4 with basic layers"
            raise ValueError(f"DenseNet depth must be {kind} (n >= 1 layers per block), got {depth}")
        if growth < 1 or not 0 < compression <= 1:
            raise ValueError(
                f"DenseNet needs growth >= 1 and 0 < compression <= 1, got {growth=}, {compression=}"
            )
        n = (depth - 4) // per_layer
        self.depth, self.growth, self.bottleneck, self.compression = depth, growth, bottleneck, compression
        self.channel_selection, self.bn_gamma = channel_selection, bn_gamma
        name = f"DenseNet-{depth}"

        # stream width at each reading position, and where each position's widths start in cfg
        streams = _stream_widths(n, growth, compression)
        per_pos = [2 if bottleneck and i % (n + 1) < n else 1 for i in range(len(streams))]
        starts = [sum(per_pos[:i]) for i in range(len(streams))]
        default = [w for c, k in zip(streams, per_pos, strict=True) for w in [c, 4 * growth][:k]]
        cfg = default if cfg is None else list(cfg)
        bad = [w for w in cfg if isinstance(w, bool) or not isinstance(w, int) or w < 1]
        if len(cfg) != len(default) or bad:
            layer = "[reads, bottleneck width]" if bottleneck else "[reads]"
            raise ValueError(
                f"{name} needs cfg of {len(default)} positive ints: the input width of every conv and of the "
                f"classifier after the stem ({n} dense layer(s) of {layer} per block,"
                f" one int per transition, "
                f"one for the classifier); got {len(cfg)} entries: {cfg}"
                + (
                    ". Zero widths are refused: a dense layer cannot be removed without changing the stream "
                    "(use a per-layer floor when pruning)"
                    if 0 in bad
                    else ""
                )
            )
        select = check_select(select, streams, channel_selection, name,
                              "one per dense layer and transition, then the final one")
        for i, (c, k) in enumerate(zip(streams, starts, strict=True)):
            kept = c if select[i] is None else len(select[i])
            if cfg[k] != kept:
                how = f"select[{i}] keeps {kept}" if select[i] is not None else "no selection: all"
                hint = (
                    f"pass select[{i}] with {cfg[k]} channel indices, or set cfg[{k}] = {kept}"
                    if channel_selection
                    else "models without channel selection read the whole stream"
                )
                raise ValueError(
                    f"{name}: cfg[{k}] = {cfg[k]} but position {i} reads {kept} of its {c} stream channels "
                    f"({how}); {hint}"
                )

        self.conv1 = nn.Conv2d(3, 2 * growth, 3, 1, 1, bias=False)
        pos = 0
        for b in range(3):
            layers = []
            for _ in range(n):
                width = cfg[starts[pos] : starts[pos] + per_pos[pos]]
                layers.append(DenseLayer(streams[pos], width, growth, channel_selection, select[pos]))
                pos += 1
            self.add_module(f"dense{b + 1}", nn.Sequential(*layers))
            if b < 2:
                out = int(math.floor(compression * streams[pos]))
                trans = Transition(streams[pos], cfg[starts[pos]], out, channel_selection, select[pos])
                self.add_module(f"trans{b + 1}", trans)
                pos += 1
        self.bn = nn.BatchNorm2d(streams[pos])
        self.select = ChannelSelection(streams[pos], select[pos]) if channel_selection else None
        self.fc = nn.Linear(cfg[-1], num_classes)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, 2 * growth, 32, 32)
        x = self.trans1(self.dense1(x))  # (N, C1, 16, 16)
        x = self.trans2(self.dense2(x))  # (N, C2, 8, 8)
        x = self.bn(self.dense3(x))  # (N, C3, 8, 8)
        if self.select is not None:
            x = self.select(x)  # (N, cfg[-1], 8, 8)
        x = F.adaptive_avg_pool2d(F.relu(x), 1)
        return self.fc(torch.flatten(x, 1))

    def named_readers(self) -> list[tuple[str, DenseLayer | Transition]]:
        """(module path, module) of the dense layers and transitions in forward order."""
        out: list[tuple[str, DenseLayer | Transition]] = []
        for k in (1, 2, 3):
            out += [(f"dense{k}.{i}", layer) for i, layer in enumerate(getattr(self, f"dense{k}"))]
            if k < 3:
                out.append((f"trans{k}", getattr(self, f"trans{k}")))
        return out

    def readers(self) -> list[DenseLayer | Transition]:
        """Dense layers and transitions in forward order (the order of ``cfg`` and ``select``)."""
        return [m for _, m in self.named_readers()]

    def selections(self) -> list[ChannelSelection | None]:
        """The selection of every stream-reading position in forward order (the classifier's last)."""
        return [r.select for r in self.readers()] + [self.select]

    def arch_kwargs(self) -> dict[str, Any]:
        cfg = [w for r in self.readers() for w in r.width()] + [self.fc.in_features]
        if not self.channel_selection:
            return {"cfg": cfg}
        select = [s.kept() for s in self.selections()]
        return {"cfg": cfg, "select": None if all(s is None for s in select) else select}

    def channel_groups(self) -> list[ChannelGroup]:
        # The stream never changes width, so the only prunable channels are what each reader takes from it
        # (slim models: through its selection, scored by the BN before it) and the bottleneck widths.
        # Neither may vanish: a dense layer cannot be removed without changing the stream.
        groups = []
        for p, reader in self.named_readers():
            if reader.select is not None:
                sel = f"{p}.select"
                groups.append(ChannelGroup(name=sel, selection=sel, consumers=(f"{p}.conv1",), bn=f"{p}.bn1"))
            if isinstance(reader, DenseLayer) and reader.bottleneck:
                groups.append(
                    ChannelGroup(
                        name=f"{p}.conv1",
                        producers=(f"{p}.conv1", f"{p}.bn2"),
                        consumers=(f"{p}.conv2",),
                        bn=f"{p}.bn2",
                        conv=f"{p}.conv1",
                    )
                )
        if self.select is not None:
            groups.append(ChannelGroup(name="select", selection="select", consumers=("fc",), bn="bn"))
        return groups

    def reset_parameters(self) -> None:
        init.he_bn_init_(self, self.bn_gamma)  # docs/paper-settings.md §1.5
        self.fc.reset_parameters()


def _stream_widths(n: int, growth: int, compression: float) -> list[int]:
    """Stream width at each of the 3n + 3 reading positions (layers, transitions, classifier)."""
    widths, c = [], 2 * growth
    for b in range(3):
        for _ in range(n):
            widths.append(c)
            c += growth
        widths.append(c)  # the transition (b < 2) or the final BN (b == 2)
        if b < 2:
            c = int(math.floor(compression * c))
    return widths


@register_model("slim_densenet")
def slim_densenet(
    cfg: Sequence[int] | None = None,
    num_classes: int = 10,
    depth: int = 40,
    growth: int = 12,
    select: Sequence[Sequence[int] | None] | None = None,
) -> DenseNet:
    """Network Slimming's DenseNet (basic layers, compression 1, channel selections) of any depth 3n+4."""
    return DenseNet(depth, num_classes, cfg, select, growth, channel_selection=True, bn_gamma=0.5)


@register_model("slim_densenet40")
def slim_densenet40(
    cfg: Sequence[int] | None = None,
    num_classes: int = 10,
    select: Sequence[Sequence[int] | None] | None = None,
) -> DenseNet:
    """Network Slimming's DenseNet-40 (growth 12, ~1.06M parameters; docs/paper-settings.md §2.5)."""
    return DenseNet(40, num_classes, cfg, select, 12, channel_selection=True, bn_gamma=0.5)


@register_model("densenet")
def densenet(
    cfg: Sequence[int] | None = None,
    num_classes: int = 10,
    depth: int = 40,
    growth: int = 12,
    bottleneck: bool = False,
    compression: float = 1.0,
) -> DenseNet:
    """bearpaw's DenseNet (no channel selection, BN gamma 1) of any size (docs/paper-settings.md §2.6)."""
    return DenseNet(
        depth, num_classes, cfg, None, growth, bottleneck, compression, channel_selection=False, bn_gamma=1.0
    )


@register_model("densenet40")
def densenet40(cfg: Sequence[int] | None = None, num_classes: int = 10) -> DenseNet:
    """Weight-level pruning's DenseNet-40: slim_densenet40 without selections, BN gamma 1."""
    return densenet(cfg, num_classes, depth=40)


@register_model("densenet_c100")
def densenet_c100(cfg: Sequence[int] | None = None, num_classes: int = 10) -> DenseNet:
    """The paper's "DenseNet-BC-100" (Table 6), really DenseNet-C: 3 x 32 basic layers, compression 0.5."""
    return densenet(cfg, num_classes, depth=100, compression=0.5)


@register_model("densenet_bc100")
def densenet_bc100(cfg: Sequence[int] | None = None, num_classes: int = 10) -> DenseNet:
    """A true DenseNet-BC-100: 3 x 16 bottleneck layers, compression 0.5 (not what the paper ran)."""
    return densenet(cfg, num_classes, depth=100, bottleneck=True, compression=0.5)
