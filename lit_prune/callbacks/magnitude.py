"""Unstructured magnitude pruning (Han et al., "Learning both Weights and Connections", NeurIPS 2015).

The weights of every conv (optionally every linear layer) with the smallest magnitudes are masked: one
global threshold over all of them, as the paper's weight-level code does (docs/paper-settings.md §9.1), or one per
layer. The masks are boolean tensors owned by this callback, enforced on the weights, their gradients
and the optimizer's momentum after every step, saved in checkpoints, and written into the artifact.

* one-shot: prune once at the end of training (or on a trained checkpoint with ``python -m lit_prune.prune``);
* gradual: prune at the end of epochs ``start_epoch .. end_epoch`` towards ``amount`` along Zhu & Gupta's
  cubic schedule; every step states the *cumulative* target sparsity, so repeated pruning never compounds
  by accident (Lightning's ``ModelPruning`` with a float amount prunes that fraction of what remains, every
  time);
* ``relative: true`` prunes ``amount`` of the *remaining* weights: one round of iterative lottery-ticket
  pruning (docs/paper-settings.md §10.1), where the previous rounds' zeros stay pruned.

With ``keep_init: true`` the initialisation theta_0 is saved before training (and in every checkpoint,
so a resumed run still rewinds to the true theta_0) and written into the artifact for lottery tickets.

YAML (Table 6, 80% of the conv weights)::

    trainer:
      callbacks:
        - class_path: callbacks.MagnitudePruning
          init_args: {amount: 0.8}
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, log_metrics, unwrap
from lit_prune.methods.base import Decision
from lit_prune.methods.magnitude import MagnitudeMasks


class MagnitudePruning(PruningCallback):
    """Mask the smallest-magnitude weights of convs (and optionally linear layers).

    Args:
        amount: target fraction of the prunable weights removed (``relative``: of those still non-zero).
        scope: ``"global"`` (one threshold over all layers, the paper) or ``"layer"`` (the same fraction in each).
        include_linear: also prune linear layers' weights (the paper prunes convs only).
        relative: prune ``amount`` of the remaining non-zero weights (iterative lottery-ticket rounds).
        start_epoch: first epoch (0-based) of gradual pruning; None prunes once at the end of training.
        end_epoch: epoch at whose end the target ``amount`` is reached (gradual pruning).
        frequency: prune every ``frequency`` epochs between ``start_epoch`` and ``end_epoch``.
        threshold: ``"exact"`` removes exactly ``k = int(N * amount)`` weights (when no magnitudes tie);
            ``"reference"`` is the paper's code, ``thr = sorted(|w|)[k]``, which removes k + 1 (the paper
            configs set it).
        keep_init: save theta_0 before training and write it into the artifact (lottery tickets).
        artifact_path: where the masked artifact is written (relative to the trainer's log directory).
    """

    def __init__(
        self,
        amount: float = 0.5,
        scope: str = "global",
        include_linear: bool = False,
        relative: bool = False,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        frequency: int = 1,
        threshold: str = "exact",
        keep_init: bool = False,
        artifact_path: str | None = "pruned.pt",
    ) -> None:
        super().__init__(artifact_path, keep_init=keep_init)
        self.pruner = MagnitudeMasks(amount, scope, include_linear, relative, start_epoch, end_epoch, frequency,
                                     threshold)
        self.amount = self.pruner.amount

    @property
    def current_sparsity(self) -> float:
        """The cumulative sparsity pruned so far (schedule state, saved in checkpoints)."""
        return float(self.state.schedule.get("current_sparsity", 0.0))

    @current_sparsity.setter
    def current_sparsity(self, value: float) -> None:
        self.state.schedule["current_sparsity"] = float(value)

    # ---- hooks ---------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        end = self.pruner.end_epoch
        if end is not None and trainer.max_epochs is not None and 0 < trainer.max_epochs <= end:
            # a run trained in parts may mean it (it resumes for more epochs later); a whole run ends short
            rank_zero_warn(f"end_epoch {end} is not an epoch of this run (max_epochs {trainer.max_epochs}, epochs "
                           f"0..{trainer.max_epochs - 1}): this run ends before the target sparsity {self.amount}; "
                           "lower end_epoch or train longer")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.pruner.target_sparsity(trainer.current_epoch)
        if target is not None and target > self.current_sparsity:
            model = unwrap(pl_module)
            self.set_masks(trainer, model, self.pruner.compute_masks(model, target), trainer.optimizers[0])
            self.current_sparsity = target
            self._log(trainer, model)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = unwrap(pl_module)
        if self.pruner.start_epoch is None:  # one-shot: the masks go into the artifact; the live model stays as trained
            self.prune(model, trainer=trainer)
            self.current_sparsity = self.amount
        else:
            self._log(trainer, model)
            self.export(model, Decision(masks=self.masks), trainer=trainer)

    def _log(self, trainer: pl.Trainer | None, model: nn.Module) -> None:
        metrics = self.pruner.metrics(model, self.masks, self.current_sparsity)
        rank_zero_info(f"magnitude pruning: sparsity {metrics['prune/sparsity']:.3f} of the prunable weights")
        log_metrics(trainer, metrics)
