"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

One-shot and per layer: in every selected layer keep the filters with the largest sum of absolute
weights, then remove the rest physically together with their BN channels and the next layer's input
slices (docs/paper-settings.md §3). The paper's targets are the named width configs of the zoo (VGG-16-A,
ResNet-56-A/B, ResNet-110-A/B, ResNet-34-A/B); a generic form prunes a ratio per layer pattern.

YAML (the paper's ResNet-56-B, pruned at the end of training)::

    trainer:
      callbacks:
        - class_path: callbacks.L1FilterPruning
          init_args:
            target: B

Generic form (the same ResNet-56-B, spelled out)::

        - class_path: callbacks.L1FilterPruning
          init_args:
            prune_ratio: {"layer1.*": 0.6, "layer2.*": 0.3, "layer3.*": 0.1}
            skip: [layer1.7.conv1, layer1.8.conv1, layer2.0.conv1, layer2.7.conv1, layer3.0.conv1, layer3.8.conv1]
"""

from __future__ import annotations

import pytorch_lightning as pl
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, unwrap
from lit_prune.methods.filter_norm import FilterNormPruning
from lit_prune.methods.plan import WidthPlan


class L1FilterPruning(PruningCallback):
    """Prune filters with the smallest L1 norm, per layer, once, at the end of training.

    Args:
        target: name of a width config of the model being pruned (``"A"``, ``"B"``): the paper's keep
            counts, taken layer by layer from that architecture.
        prune_ratio: fraction of filters removed, one number for every layer or a mapping from layer
            name patterns (``"layer1.*"``) to fractions; ``num_keep = int(C * (1 - ratio))``.
        keep: explicit number of filters kept per layer name pattern (``{"features.0": 32}``).
        skip: layer name patterns left at full width (the paper's sensitive layers).
        criterion: ``"l1"`` (the paper) or ``"l2"``.
        floor: keep at least this many filters per layer (0 lets a residual branch vanish).
        mode: ``"physical"`` removes the filters (a narrower model); ``"mask"`` keeps the full-size model
            and masks each pruned filter with its BN channel and the next layer's input slice (the
            structured lottery-ticket experiments, docs/paper-settings.md §10.1, without the reference's indexing bug).
        keep_init: save theta_0 before training and write it into the artifact (lottery tickets).
        artifact_path: where the artifact is written (relative to the trainer's log directory).
        aggregate: how the norms of a group's coupled layers combine (a residual stream of a model outside
            the zoo): ``"first"`` (the group's own conv, the paper), ``"sum"`` or ``"mean"``.
        round_to: round each width from ``prune_ratio`` up to a multiple of this (1: off, as in the paper).
        global_ranking: rank the filters of all layers together (norms divided by their layer's mean) and
            remove ``prune_ratio`` of them all; each layer keeps ``floor`` and loses at most ``max_layer_ratio``.
        max_layer_ratio: the most a layer may lose under ``global_ranking``.

    Exactly one of ``target``, ``prune_ratio`` and ``keep`` is given.
    """

    def __init__(
        self,
        target: str | None = None,
        prune_ratio: float | dict[str, float] | None = None,
        keep: dict[str, int] | None = None,
        skip: list[str] | None = None,
        criterion: str = "l1",
        floor: int = 0,
        mode: str = "physical",
        keep_init: bool = False,
        artifact_path: str | None = "pruned.pt",
        aggregate: str = "first",
        round_to: int = 1,
        global_ranking: bool = False,
        max_layer_ratio: float = 0.9,
    ) -> None:
        super().__init__(artifact_path, keep_init=keep_init)
        widths = WidthPlan(target=target, prune_ratio=prune_ratio, keep=keep, skip=list(skip or []), floor=floor,
                           unit="filters", round_to=round_to, global_ranking=global_ranking,
                           max_layer_ratio=max_layer_ratio)
        self.pruner = FilterNormPruning(widths, criterion=criterion, mode=mode, aggregate=aggregate)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(unwrap(pl_module), trainer=trainer)
