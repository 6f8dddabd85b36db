"""Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017, arXiv:1708.06519).

Two parts (docs/paper-settings.md §6):

1. **Sparsity training.** An L1 penalty ``s * sum |gamma|`` on the scaling factor of every BatchNorm,
   applied as a subgradient: after ``backward()`` and before the optimizer step, ``gamma.grad += s *
   sign(gamma)``. CIFAR regularises every BatchNorm2d; ImageNet VGG-11 also its BatchNorm1d
   (``include_bn1d``). This works on any model, zoo or not.
2. **Pruning at the end of training.** The |gamma| of every BN-scored channel group of the model go into
   *one* global threshold, ``thr = sorted(all)[int(total * prune_ratio)]``; a channel survives iff its
   |gamma| is strictly greater (ties at the threshold are pruned). The physically pruned copy is written as
   an artifact; the live model is left as it is. BNs in front of a channel selection (PreResNet block
   inputs, every DenseNet BN, the final BN) prune what the following conv reads, not the stream itself.

The paper has no per-layer minimum (docs/paper-settings.md §12.14): a layer can lose every channel. A residual branch
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

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, unwrap
from lit_prune.core.groups import channel_groups
from lit_prune.methods.slimming import BNScaleSlimming


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
        threshold: ``"exact"`` removes exactly ``int(total * prune_ratio)`` channels (when no scales tie);
            ``"reference"`` is the paper's code, ``thr = sorted(|gamma|)[k]``, which removes one more. The paper
            configs set ``reference``, so that the channels kept are the reference's.
        aggregate: how a channel's scale is read when several norms share it (a residual stream of a model
            outside the zoo): ``"first"`` (the group's first norm), ``"sum"`` or ``"mean"`` over all of them.

    Raises:
        ValueError: an argument outside its range (the message names it).
    """

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
        threshold: str = "exact",
        aggregate: str = "first",
    ) -> None:
        super().__init__(artifact_path)
        if isinstance(histogram_every_n_epochs, bool) or not isinstance(histogram_every_n_epochs, int) or (
            histogram_every_n_epochs < 0
        ):
            raise ValueError(f"histogram_every_n_epochs must be an int >= 0 (0 = never), got "
                             f"{histogram_every_n_epochs!r}")
        self.pruner = BNScaleSlimming(sparsity, prune_ratio, include_bn1d, floor, threshold, aggregate)
        self.prune_at_end, self.histogram_every_n_epochs = prune_at_end, histogram_every_n_epochs
        self._bn_names: list[str] | None = None  # module paths of the regularised BNs in the network

    # ---- hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Recorded before the strategy may turn BNs into SyncBatchNorm, which forgets BN2d vs BN1d; named in
        # the network, as the pruned groups are (prune/kept/features.0, bn_gamma/features.1).
        self._bn_names = self.pruner.find_bns(unwrap(pl_module))
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
        self.pruner.add_sparsity_grad(unwrap(pl_module), self._bns(pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = unwrap(pl_module)
        gammas = {n: model.get_submodule(n).weight for n in self._bns(pl_module)}
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

    def _bns(self, pl_module: pl.LightningModule) -> list[str]:
        """The regularised BNs, as found before the strategy could turn them into SyncBatchNorm."""
        return self._bn_names if self._bn_names is not None else self.pruner.find_bns(unwrap(pl_module))

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
