"""Unstructured magnitude pruning (Han et al., "Learning both Weights and Connections", NeurIPS 2015).

The weights of every conv (optionally every linear layer) with the smallest magnitudes are masked: one
global threshold over all of them, as the paper's weight-level code does (paper-spec 9.1), or one per
layer. The masks are boolean tensors owned by this callback, enforced on the weights, their gradients
and the optimizer's momentum after every step, saved in checkpoints, and written into the artifact.

* one-shot: prune once at the end of training (or on a trained checkpoint with ``python -m lit_prune.prune``);
* gradual: prune at the end of epochs ``start_epoch .. end_epoch`` towards ``amount`` along Zhu & Gupta's
  cubic schedule; every step states the *cumulative* target sparsity, so repeated pruning never compounds
  by accident (Lightning's ``ModelPruning`` with a float amount prunes that fraction of what remains, every
  time);
* ``relative: true`` prunes ``amount`` of the *remaining* weights: one round of iterative lottery-ticket
  pruning (paper-spec 10.1), where the previous rounds' zeros stay pruned.

With ``keep_init: true`` the initialisation theta_0 is saved before training (and in every checkpoint,
so a resumed run still rewinds to the true theta_0) and written into the artifact for lottery tickets.

YAML (Table 6, 80% of the conv weights)::

    trainer:
      callbacks:
        - class_path: callbacks.MagnitudePruning
          init_args: {amount: 0.8}
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, log_metrics, unwrap
from lit_prune.core.masks import Masks, sparsity
from lit_prune.core.selection import check_ratio, threshold_keep


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
        keep_init: save theta_0 before training and write it into the artifact (lottery tickets).
        artifact_path: where the masked artifact is written (relative to the trainer's log directory).
    """

    method = "magnitude"

    def __init__(
        self,
        amount: float = 0.5,
        scope: str = "global",
        include_linear: bool = False,
        relative: bool = False,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        frequency: int = 1,
        keep_init: bool = False,
        artifact_path: str | None = "pruned.pt",
    ) -> None:
        super().__init__(artifact_path, keep_init=keep_init)
        check_ratio(amount, "amount")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' (one threshold, the paper) or 'layer', got {scope!r}")
        if (start_epoch is None) != (end_epoch is None):
            raise ValueError("gradual pruning needs both start_epoch and end_epoch; give neither for one-shot pruning")
        if start_epoch is not None and not 0 <= start_epoch <= end_epoch:
            raise ValueError(f"need 0 <= start_epoch <= end_epoch, got {start_epoch} and {end_epoch}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1 epoch, got {frequency}")
        if relative and start_epoch is not None:
            raise ValueError("relative pruning is one-shot (one lottery-ticket round); drop start_epoch/end_epoch")
        self.amount, self.scope, self.include_linear, self.relative = float(amount), scope, include_linear, relative
        self.start_epoch, self.end_epoch, self.frequency = start_epoch, end_epoch, frequency

    @property
    def current_sparsity(self) -> float:
        """The cumulative sparsity pruned so far (schedule state, saved in checkpoints)."""
        return float(self.state.schedule.get("current_sparsity", 0.0))

    @current_sparsity.setter
    def current_sparsity(self, value: float) -> None:
        self.state.schedule["current_sparsity"] = float(value)

    # ---- hooks ---------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target_sparsity(trainer.current_epoch)
        if target is not None and target > self.current_sparsity:
            model = unwrap(pl_module)
            self.set_masks(trainer, model, self.compute_masks(model, target), trainer.optimizers[0])
            self.current_sparsity = target
            self._log(trainer, model)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = unwrap(pl_module)
        if self.start_epoch is None:  # one-shot: the masks go into the artifact; the live model stays as trained
            self.masks = self.broadcast(trainer, self.compute_masks(model, self.amount))
            self.current_sparsity = self.amount
        self._log(trainer, model)
        self.export(model, {}, trainer=trainer, masks=self.masks)

    @override
    def prune(
        self, model: nn.Module, *, trainer: pl.Trainer | None = None, path: str | None = None,
        source: str | None = None, init_state: dict[str, torch.Tensor] | None = None, dataloader: Any = None,
    ) -> dict[str, Any] | None:
        """One-shot pruning of a trained model into a masked artifact (the model itself is not changed)."""
        self.masks = self.broadcast(trainer, self.compute_masks(model, self.amount))
        return self.export(model, {}, trainer=trainer, masks=self.masks, path=path, source=source,
                           init_state=init_state)

    # ---- selection -----------------------------------------------------------------------------------
    def target_sparsity(self, epoch: int) -> float | None:
        """Cumulative target after ``epoch`` (0-based) in gradual mode, or None when no pruning is due.

        Zhu & Gupta's cubic ramp: ``amount * (1 - (1 - t)^3)`` with ``t`` the fraction of the pruning
        window done, reaching ``amount`` at ``end_epoch``. The target is 0 at ``start_epoch`` itself, so
        the first weights go at the end of epoch ``start_epoch + frequency``.
        """
        if self.start_epoch is None or not self.start_epoch <= epoch <= self.end_epoch:
            return None
        if epoch != self.end_epoch and (epoch - self.start_epoch) % self.frequency:
            return None
        span = self.end_epoch - self.start_epoch
        t = 1.0 if span == 0 else (epoch - self.start_epoch) / span
        return self.amount * (1 - (1 - t) ** 3)

    def prunable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{parameter name: weight}`` of every prunable layer."""
        kinds = (nn.Conv2d, nn.Linear) if self.include_linear else (nn.Conv2d,)
        params = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, kinds)}
        if not params:
            raise ValueError(f"{type(model).__name__} has no conv{' or linear' if self.include_linear else ''} "
                             "layer to prune")
        return params

    @torch.no_grad()
    def compute_masks(self, model: nn.Module, target: float) -> Masks:
        """Masks removing ``target`` of the prunable weights (or of the non-zero ones when ``relative``).

        The paper's rule: a weight survives iff ``|w| > thr``, so ties at the threshold are pruned and
        slightly more than ``target`` may go. ``thr`` is the k-th smallest magnitude, ``k = int(N * target)``,
        so exactly k weights go when magnitudes are distinct (the reference takes ``sorted(|w|)[k]``, one
        further, and removes k + 1). Weights already masked (zero) are the smallest and stay pruned: the
        schedule's sparsity is cumulative.
        """
        params = self.prunable(model)
        groups = [params] if self.scope == "global" else [{k: v} for k, v in params.items()]
        masks: Masks = {}
        for group in groups:
            n = sum(w.numel() for w in group.values())
            zeros = sum(int((w == 0).sum()) for w in group.values()) if self.relative else 0
            k = zeros + int((n - zeros) * target)
            # exactly the k smallest magnitudes go (the reference's sorted[k] removes k + 1; and with k = 0
            # pruning nothing, its count would jump from 0 to 2 between k = 0 and k = 1)
            keeps = threshold_keep([w.abs() for w in group.values()], k, rule="exact")
            masks.update(zip(group, keeps, strict=True))
        for name, m in masks.items():
            if not m.any():
                rank_zero_info(f"magnitude pruning removed every weight of {name}")
        return masks

    def _log(self, trainer: pl.Trainer | None, model: nn.Module) -> None:
        metrics = {"prune/sparsity": sparsity(model, self.masks), "prune/target_sparsity": self.current_sparsity}
        rank_zero_info(f"magnitude pruning: sparsity {metrics['prune/sparsity']:.3f} of the prunable weights")
        metrics.update({f"prune/sparsity/{k}": 1 - m.float().mean().item() for k, m in self.masks.items()})
        log_metrics(trainer, metrics)
