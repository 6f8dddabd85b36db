"""Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017, arXiv:1708.06519).

Two parts (paper-spec section 6):

1. **Sparsity training.** An L1 penalty ``s * sum |gamma|`` on the scaling factor of every BatchNorm,
   applied as a subgradient: after ``backward()`` and before the optimizer step, ``gamma.grad += s *
   sign(gamma)``. CIFAR regularises every BatchNorm2d; ImageNet VGG-11 also its BatchNorm1d
   (``include_bn1d``). This works on any model, zoo or not.
2. **Pruning at the end of training.** The |gamma| of every BN-scored channel group of the model go into
   *one* global threshold, ``thr = sorted(all)[int(total * prune_ratio)]``; a channel survives iff its
   |gamma| is strictly greater (ties at the threshold are pruned). The physically pruned copy is written as
   an artifact; the live model is left as it is. BNs in front of a channel selection (PreResNet block
   inputs, every DenseNet BN, the final BN) prune what the following conv reads, not the stream itself.

The paper has no per-layer minimum (paper-spec 12.14): a layer can lose every channel. A residual branch
that does so vanishes (its block becomes its shortcut); any other layer cannot, and pruning stops with an
error that suggests ``floor: 1`` (keep each layer's strongest channel). The paper's PreResNet-164 at 60%
on CIFAR-100 is such a case.

YAML (CIFAR-10 VGG-19 at 70%, paper Table 4)::

    trainer:
      callbacks:
        - class_path: callbacks.NetworkSlimming
          init_args: {sparsity: 1.0e-4, prune_ratio: 0.7}

TensorBoard: ``prune/bn_l1`` (sum of |gamma| over the regularised BNs) every epoch, histograms of the
gammas (``bn_gamma/all`` and one per layer) every ``histogram_every_n_epochs`` epochs, and the export
metrics (``prune/flops_ratio``, ``prune/kept/<layer>``, ...) at the end.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, unwrap
from lit_prune.core.groups import ChannelGroup, channel_groups
from lit_prune.core.importance import group_scores
from lit_prune.core.selection import apply_floor, check_not_emptied, check_ratio, global_threshold


class NetworkSlimming(PruningCallback):
    """L1 sparsity on BatchNorm scaling factors during training, then one global-threshold channel prune.

    Args:
        sparsity: the paper's ``s``, weight of the L1 penalty on gamma (CIFAR VGG 1e-4; PreResNet,
            DenseNet and ImageNet VGG-11 1e-5). 0 trains without it.
        prune_ratio: fraction of all scored BN channels removed, in [0, 1).
        include_bn1d: also regularise and prune BatchNorm1d channels (ImageNet VGG-11's FC head).
        floor: keep at least this many channels in every layer; 0 is the paper (no floor).
        prune_at_end: prune and write the artifact when training ends; False only trains with sparsity
            (prune later with ``python -m lit_prune.prune``).
        artifact_path: where the artifact is written (relative to the trainer's log directory); None
            writes none.
        histogram_every_n_epochs: log gamma histograms to TensorBoard every this many epochs; 0 never.

    Raises:
        ValueError: an argument outside its range (the message names it).
    """

    method = "network_slimming"
    # Slimming trains the dense model and prunes once at the end: nothing is masked during fit.
    # Its checkpoint state is therefore the base class's (masks, dense FLOPs counts); there is no
    # schedule to resume, the gammas themselves (in the model's state) carry the training progress.

    def __init__(
        self,
        sparsity: float = 1e-4,
        prune_ratio: float = 0.7,
        include_bn1d: bool = False,
        floor: int = 0,
        prune_at_end: bool = True,
        artifact_path: str | None = "pruned.pt",
        histogram_every_n_epochs: int = 1,
    ) -> None:
        super().__init__(artifact_path)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not sparsity >= 0:
            raise ValueError(f"sparsity (the L1 weight s on BN gamma) must be a number >= 0, got {sparsity!r}; "
                             "the paper uses 1e-4 (CIFAR VGG) or 1e-5 (PreResNet, DenseNet, ImageNet)")
        check_ratio(prune_ratio, "prune_ratio")
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"floor (minimum channels kept per layer) must be an int >= 0, got {floor!r}")
        if isinstance(histogram_every_n_epochs, bool) or not isinstance(histogram_every_n_epochs, int) or (
            histogram_every_n_epochs < 0
        ):
            raise ValueError(f"histogram_every_n_epochs must be an int >= 0 (0 = never), got "
                             f"{histogram_every_n_epochs!r}")
        self.sparsity, self.prune_ratio, self.include_bn1d = float(sparsity), float(prune_ratio), include_bn1d
        self.floor, self.prune_at_end, self.histogram_every_n_epochs = floor, prune_at_end, histogram_every_n_epochs
        self._bn_names: list[str] | None = None  # module paths of the regularised BNs, relative to pl_module

    # ---- hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Recorded before the strategy may turn BNs into SyncBatchNorm, which forgets BN2d vs BN1d.
        self._bn_names = self._find_bns(pl_module)
        if self.prune_at_end and stage == "fit":
            # fail now rather than after the whole sparsity training (user models are traced for their groups)
            try:
                channel_groups(unwrap(pl_module))
            except TypeError as err:
                raise ValueError(
                    f"NetworkSlimming cannot prune a {type(unwrap(pl_module)).__name__} at the end of training: "
                    f"{err}. Set prune_at_end: false to train with the sparsity penalty only"
                ) from None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        # Called once per optimizer step (not per accumulated batch), after AMP has unscaled the gradients
        # and after DDP has averaged them, so the term is added exactly once and identically on every rank.
        self.add_sparsity_grad(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gammas = self._gammas(pl_module)
        if not gammas:
            return
        l1 = sum(g.detach().abs().sum() for g in gammas.values())
        pl_module.log("prune/bn_l1", l1.float(), on_step=False, on_epoch=True, sync_dist=True)
        n = self.histogram_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._log_histograms(trainer, gammas)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prune_at_end:
            self.prune(unwrap(pl_module), trainer=trainer)

    # ---- sparsity ------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_sparsity_grad(self, module: nn.Module) -> None:
        """``gamma.grad += s * sign(gamma)`` for every regularised BN of ``module`` (grads that exist)."""
        if self.sparsity == 0:
            return
        for g in self._gammas(module).values():
            if g.grad is not None:
                g.grad.add_(torch.sign(g.detach()), alpha=self.sparsity)

    def _regularised(self, bn: nn.Module) -> bool:
        # A SyncBatchNorm no longer says whether it was 1d or 2d; one present before fit is taken as 2d.
        if isinstance(bn, nn.BatchNorm1d):
            return self.include_bn1d
        return isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))

    def _find_bns(self, module: nn.Module) -> list[str]:
        return [n for n, m in module.named_modules() if self._regularised(m) and getattr(m, "weight", None) is not None]

    def _gammas(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """{BN module path: its weight (gamma)} of the regularised BNs."""
        names = self._bn_names if self._bn_names is not None else self._find_bns(module)
        return {n: module.get_submodule(n).weight for n in names}

    def _log_histograms(self, trainer: pl.Trainer, gammas: dict[str, torch.Tensor]) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        values = {n: g.detach().float().cpu() for n, g in gammas.items()}
        everything = torch.cat([v.flatten() for v in values.values()])
        for lg in loggers:
            exp = lg.experiment
            exp.add_histogram("bn_gamma/all", everything, global_step=trainer.global_step)
            for name, v in values.items():
                exp.add_histogram(f"bn_gamma/{name or 'bn'}", v, global_step=trainer.global_step)

    # ---- pruning -------------------------------------------------------------------------------------
    @override
    def select(self, model: nn.Module, dataloader: Any = None) -> dict[str, torch.Tensor]:
        """Keep vectors of every BN-scored group under one global |gamma| threshold.

        Raises:
            ValueError: the model has no BN-scored groups, or a layer that is not a residual branch would
                lose every channel (set ``floor: 1`` or lower ``prune_ratio``).
        """
        groups = [g for g in channel_groups(model) if g.bn is not None and self._regularised(model.get_submodule(g.bn))]
        if not groups:
            raise ValueError(f"{type(model).__name__} has no channel group with a BatchNorm"
                             f"{'' if self.include_bn1d else '2d'} to score; Network Slimming needs BN layers")
        scores = [group_scores(model, g, "bn_gamma") for g in groups]
        keeps = global_threshold(scores, self.prune_ratio, rule="reference")  # the reference's sorted[k]
        keeps = [apply_floor(s, k, self.floor) for s, k in zip(scores, keeps, strict=True)]
        result = {g.name: k for g, k in zip(groups, keeps, strict=True)}
        self._check_vanishing(groups, result)
        return result

    def _check_vanishing(self, groups: list[ChannelGroup], keeps: dict[str, torch.Tensor]) -> None:
        # Residual branches pruned to nothing disappear whole; a group living inside one (a block's
        # selection, read only by that block's conv1) goes with it. Anything else may not reach zero.
        gone = {p for g in groups if g.branch and not bool(keeps[g.name].any()) for p in g.branch}
        for g in groups:
            if bool(keeps[g.name].any()) or g.branch:
                continue
            touched = set(g.producers) | set(g.consumers)
            if touched and touched <= gone:
                continue
            check_not_emptied(
                g.name, 0, g.branch,
                f"Network Slimming's global threshold (prune_ratio {self.prune_ratio}) removes all of it (scored by "
                f"BN {g.bn!r}). Set floor: 1 to keep each layer's strongest channel, or lower prune_ratio (the paper "
                "has no floor; paper-spec 12.14)",
            )
