"""Soft Filter Pruning (He, Kang, Dong, Fu, Yang, "Soft Filter Pruning for Accelerating Deep Convolutional
Neural Network Models", IJCAI 2018), as the rethinking paper's reference code runs it (docs/paper-settings.md §8.1).

During training, in every selected conv, the ``int(C_out * prune_ratio)`` filters with the smallest L2
norm are set to zero: once before the first step, then after every ``interval``-th epoch and after the
last one (right after the epoch's last step, so that its validation measures the pruned model like the
reference's recorded ``val_acc_2``). Masks and the last re-prune's epoch live in the callback's checkpoint
state, so ``fit(ckpt_path=...)`` resumes exactly.

Pruning is *soft*: between re-prunings the zeroed filters receive gradients and may grow back, and
every re-prune ranks all filters afresh, so a different set may be chosen. Only conv weights are
touched: BatchNorm, the classifier and the optimizer's momentum are left as they are (the reference code
multiplies the weights and nothing else).

How a zeroed filter regrows depends on what follows it. Its channel outputs BN's beta; where a ReLU
follows directly (the stem, each block's first conv) and beta <= 0, no gradient reaches it and it can
only move by its optimizer momentum (behind a residual add, a block's second conv, gradients usually
still arrive). Hence, as in the reference: in a run from scratch (beta = 0, no momentum before the
first step) the filters zeroed before training in the stem and in each block's first conv stay zero, so
their first selection is final; keeping the momentum is what lets filters zeroed at later re-prunes
come back there (zeroing it would freeze those too).

Which convs: every ``Conv2d`` by default, the stem and each block's second conv included, as the
reference's ``mask_index``. Its ``layer_begin 0 / layer_inter 3 / layer_end 54`` (ResNet-20; 90, 162,
324 for ResNet-32/56/110) walk the parameter list three at a time (conv weight, BN weight, BN bias), which
is exactly every conv weight, so ``layers: ["*"]``. ``layers``/``skip`` take shell patterns over module
names (``conv1``, ``layer2.3.conv2``) to restrict that set.

At the end of training two artifacts are written (paths relative to the trainer's log directory):

* ``masked_artifact_path`` (``sfp-masked.pt``): the paper's result, the full-size network with its
  zero filters, carrying the filter masks. Its FLOPs count non-zero weights only (only output filters
  are zero, so this understates the saving, as the reference's Scratch-B ratio does; docs/paper-settings.md §8.2).
  Scratch-E/B start from it (``model.artifact: .../sfp-masked.pt``, ``model.regime: scratch``).
* ``artifact_path`` (``pruned.pt``): a physically smaller model, where the architecture allows it. In the
  CIFAR ResNets only a block's first conv can lose filters (the second one feeds the residual add), so
  those filters are removed together with their BN channels and the next conv's inputs; the stem and
  the second convs keep their zero filters as masks. Removing a channel also removes its BN beta, which
  the masked model still adds: the small model equals the masked model with the BN gamma/beta of the
  removed channels zeroed as well (the "BN-masked variant"), not the masked model itself.

YAML (SFP from scratch on the SFP baseline recipe, the README's ``--rate 0.7`` = 30% of filters pruned)::

    trainer:
      callbacks:
        - class_path: callbacks.SoftFilterPruning
          init_args:
            prune_ratio: 0.3
            interval: 1
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_prune.artifact import Architecture, Artifact, make_artifact
from lit_prune.callbacks.base import PruningCallback, log_metrics, unwrap
from lit_prune.core.masks import Masks, apply_masks
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.base import Decision, check_finite
from lit_prune.methods.sfp import SoftFilterSelection

log = logging.getLogger(__name__)


class SoftFilterPruning(PruningCallback):
    """Zero the lowest-norm filters of every selected conv, again and again during training.

    Args:
        prune_ratio: fraction of each layer's filters zeroed, ``int(C_out * prune_ratio)`` of them
            (16 -> 4, 32 -> 9, 64 -> 19 at 0.3). The reference's ``--rate`` is a *keep* ratio:
            ``--rate 0.7`` is ``prune_ratio: 0.3``.
        layers: shell patterns over ``Conv2d`` module names; the convs pruned (default: all of them).
        skip: patterns of convs left whole, applied after ``layers``.
        interval: re-prune after every ``interval`` epochs (epochs ``interval``, ``2 * interval``, ...,
            counted from 1), and after the last epoch. The reference's ``--epoch_prune`` (1 in its
            README); with a larger value the reference also prunes after the first epoch.
        criterion: filter score, ``"l2"`` (the paper) or ``"l1"``.
        artifact_path: the physically smaller model; None writes none.
        masked_artifact_path: the full-size model with zero filters and its masks; None writes none.

    Raises:
        ValueError: ``prune_ratio`` outside [0, 1), ``interval`` < 1, an unknown criterion, empty
            ``layers``; at fit start, a pattern that matches no conv.
    """

    # Soft: masks record the last selection but are not imposed between re-prunings.
    enforce_masks = False

    def __init__(
        self,
        prune_ratio: float = 0.3,
        layers: Sequence[str] = ("*",),
        skip: Sequence[str] = (),
        interval: int = 1,
        criterion: str = "l2",
        artifact_path: str | None = "pruned.pt",
        masked_artifact_path: str | None = "sfp-masked.pt",
    ) -> None:
        super().__init__(artifact_path)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive number of epochs between re-prunings (1 = every "
                             f"epoch, as the paper's --epoch_prune 1), got {interval!r}")
        self.pruner = SoftFilterSelection(prune_ratio, layers, skip, criterion)
        self.interval = interval
        self.masked_artifact_path = masked_artifact_path
        self.masked_written: str | None = None
        self._restored = False

    # ---- state: the schedule position lives in the pruning state, saved in checkpoints ----------------
    @property
    def last_prune_epoch(self) -> int | None:
        """Epochs completed (0 = before training) at the last re-prune."""
        return self.state.schedule.get("last_prune_epoch")

    @last_prune_epoch.setter
    def last_prune_epoch(self, value: int | None) -> None:
        self.state.schedule["last_prune_epoch"] = value

    @property
    def last_prune_step(self) -> int | None:
        """The global step of the last re-prune."""
        return self.state.schedule.get("last_prune_step")

    @last_prune_step.setter
    def last_prune_step(self, value: int | None) -> None:
        self.state.schedule["last_prune_step"] = value

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = bool(self.masks)

    # ---- hooks -------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.pruner.target_convs(unwrap(pl_module))  # a pattern typo fails before the first step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored:
            # Resumed: the checkpoint's selection stands. At an epoch boundary the weights are already
            # zero there, so this changes nothing; re-selecting could break ties among zero filters.
            apply_masks(unwrap(pl_module), self.masks)
            self._restored = False
        else:
            self.reprune(trainer, unwrap(pl_module))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Re-prune right after the epoch's last step, before its validation: the logged val metrics
        # then measure the pruned model, as the reference's recorded val_acc_2 does.
        if trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._reprune_if_due(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reprune_if_due(trainer, pl_module)  # no-op unless the last batch went unrecognised

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = unwrap(pl_module)
        if self.last_prune_step != trainer.global_step:  # stopped between re-prunings (max_steps, early stop)
            self.reprune(trainer, model)
        self.write_artifacts(model, trainer=trainer)

    def compute_masks(self, model: nn.Module) -> Masks:
        """This rank's selection (:meth:`SoftFilterSelection.compute_masks`); rank 0's is what every rank keeps."""
        return self.pruner.compute_masks(model)

    def reprune(self, trainer: pl.Trainer | None, model: nn.Module, epoch: int | None = None) -> None:
        """Select filters afresh (rank 0's choice on every rank) and zero them; weights only.

        Args:
            epoch: epochs completed at this re-prune, for the schedule state (default: the trainer's).
        """
        previous = self.masks
        self.set_masks(trainer, model, self.compute_masks(model))  # no optimizer: momentum is kept
        if trainer is not None:
            self.last_prune_epoch = trainer.current_epoch if epoch is None else epoch
            self.last_prune_step = trainer.global_step
        self._log_selection(trainer, previous)

    # ---- export ------------------------------------------------------------------------------------
    @override
    def prune(
        self, model: nn.Module, *, trainer: pl.Trainer | None = None, path: str | None = None,
        source: str | None = None, init_state: dict[str, torch.Tensor] | None = None, dataloader: Any = None,
        input_size: tuple[int, ...] | None = None,
    ) -> Artifact | None:
        """One final selection on a trained model (zeroed in place), then both artifacts.

        For ``python -m lit_prune.prune`` on an SFP checkpoint: ``path`` is the small artifact, and a
        relative ``masked_artifact_path`` is written beside it.

        Returns:
            The small artifact, or the masked one where nothing can be removed physically.

        Raises:
            ValueError: a network outside the zoo that no file can rebuild (:class:`~lit_prune.artifact.Architecture`).
        """
        if not is_zoo_model(model) and (self.resolve_path(trainer, path) or self._masked_target(trainer, path)):
            Architecture.of(model)  # a network no file can rebuild: refused before the selection zeroes anything
        check_finite(model)
        self.input_size(trainer, model, input_size)
        self.reprune(trainer, model)
        return self.write_artifacts(model, trainer=trainer, path=path, source=source, init_state=init_state)

    def write_artifacts(
        self, model: nn.Module, *, trainer: pl.Trainer | None = None, path: str | None = None,
        source: str | None = None, init_state: dict[str, torch.Tensor] | None = None,
    ) -> Artifact | None:
        """Write the masked full-size artifact and, where possible, the physically smaller one (rank 0).

        ``model`` must hold the current selection's zeros (``reprune`` does that); it is left as it is (a
        network outside the zoo too: its smaller artifact is cut from a copy).

        Returns:
            The small artifact, else the masked one (None for a network outside the zoo with no path to write).
        """
        # dense counts ignore zeros, so the masked model gives them too
        dense = self.state.record_dense(lambda: self.dense_of(model))
        init = self.init_state if self.init_state is not None else init_state
        if not is_zoo_model(model) and self._masked_target(trainer, path) is None \
                and self.resolve_path(trainer, path) is None:
            return None  # nothing to write: a network outside the zoo need not be rebuildable then
        masked = make_artifact(model, method=self.method, settings=self.settings(), source=source,
                               dense=dense, masks=self.masks, init_state=init, input_size=self.state.input_size)
        self.masked_written = self.write(masked, self._masked_target(trainer, path), trainer)
        small = self._export_small(model, trainer, path, source, init)
        return small if small is not None else masked

    def _export_small(
        self, model: nn.Module, trainer: pl.Trainer | None, path: str | None, source: str | None,
        init_state: dict[str, torch.Tensor] | None,
    ) -> Artifact | None:
        if path is None and self.artifact_path is None:
            return None
        try:
            keeps = self.pruner.removable_keeps(model, self.masks)
        except TypeError as err:  # a model without declared channel groups
            rank_zero_info(f"SFP: no physically smaller model ({err})")
            return None
        if not keeps:
            rank_zero_info("SFP: none of the masked convs can lose filters physically; only the masked artifact")
            return None
        # Convs that keep their width (stem, convs feeding a residual add) keep their zero filters as masks;
        # a mask is dropped where surgery changed its parameter's output dimension.
        shrunk = copy.deepcopy(model)
        prune_groups(shrunk, keeps)
        params = dict(shrunk.named_parameters())
        residual = {k: m for k, m in self.masks.items() if k in params and params[k].shape[0] == m.shape[0]}
        # export cuts a network outside the zoo in place: give it a copy, the trained model keeps its zeros
        work = model if is_zoo_model(model) else copy.deepcopy(model)
        return self.export(work, Decision(keeps=keeps, masks=residual), trainer=trainer, path=path, source=source,
                           init_state=init_state)

    def _masked_target(self, trainer: pl.Trainer | None, path: str | None) -> Path | None:
        if self.masked_artifact_path is None:
            return None
        target = Path(self.masked_artifact_path)
        if path is not None and not target.is_absolute():  # prune() on a trained model: beside its artifact
            return Path(path).parent / target
        return self.resolve_path(trainer, self.masked_artifact_path)

    # ---- private helpers ---------------------------------------------------------------------------
    def _reprune_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        completed = trainer.current_epoch + 1  # the epoch whose training steps just ended, counted from 1
        due = completed % self.interval == 0 or completed == trainer.max_epochs
        if due and self.last_prune_epoch != completed:
            self.reprune(trainer, unwrap(pl_module), epoch=completed)

    def _log_selection(self, trainer: pl.Trainer | None, previous: Masks) -> None:
        zeroed = {name.removesuffix(".weight"): int((~m).sum()) for name, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        metrics: dict[str, float] = {"prune/sparsity": sum(zeroed.values()) / total if total else 0.0}
        if previous.keys() == self.masks.keys():  # how many filters changed sides since the last re-prune
            metrics["prune/mask_changes"] = sum(int((previous[k] != m).sum()) for k, m in self.masks.items())
        metrics.update({f"prune/zeroed/{name}": n for name, n in zeroed.items()})
        log.debug("SFP re-prune: %d/%d filters zeroed", sum(zeroed.values()), total)
        log_metrics(trainer, metrics)
