"""Unstructured magnitude pruning (Han et al., NeurIPS 2015), as plain PyTorch: masks from one global (or
per-layer) threshold over the conv (and optionally linear) weights, one-shot or along Zhu & Gupta's cubic
schedule. The Lightning callback is :class:`lit_prune.callbacks.MagnitudePruning`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from lit_prune.core.masks import Masks, sparsity
from lit_prune.core.selection import THRESHOLD_RULES, check_ratio, threshold_keep
from lit_prune.methods.base import Context, Decision, PruningMethod

log = logging.getLogger(__name__)


class MagnitudeMasks(PruningMethod):
    """The smallest-magnitude weights masked (arguments: see :class:`lit_prune.callbacks.MagnitudePruning`).

    Raises:
        ValueError: an argument outside its range (the message names it).
    """

    name = "magnitude"

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
    ) -> None:
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
        if threshold not in THRESHOLD_RULES:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLD_RULES)} ('reference': the paper's code, "
                             f"sorted[k], which removes one weight more), got {threshold!r}")
        self.start_epoch, self.end_epoch, self.frequency = start_epoch, end_epoch, frequency
        self.threshold = threshold

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
        slightly more than ``target`` may go. With ``threshold: exact`` (the default) ``thr`` is the k-th
        smallest magnitude, ``k = int(N * target)``, so exactly k weights go when magnitudes are distinct;
        ``threshold: reference`` takes the reference's ``sorted(|w|)[k]``, one further, and removes k + 1.
        Weights already masked (zero) are the smallest and stay pruned: the schedule's sparsity is cumulative.
        """
        params = self.prunable(model)
        groups = [params] if self.scope == "global" else [{k: v} for k, v in params.items()]
        masks: Masks = {}
        for group in groups:
            n = sum(w.numel() for w in group.values())
            zeros = sum(int((w == 0).sum()) for w in group.values()) if self.relative else 0
            k = zeros + int((n - zeros) * target)
            keeps = threshold_keep([w.abs() for w in group.values()], k, rule=self.threshold)
            masks.update(zip(group, keeps, strict=True))
        for name, m in masks.items():
            if not m.any():
                log.info("magnitude pruning removed every weight of %s", name)
        return masks

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        """One-shot: masks removing ``amount`` of the prunable weights (the model itself is not changed)."""
        masks = self.compute_masks(model, self.amount)
        return Decision(masks=masks, metrics=self.metrics(model, masks, self.amount))

    @staticmethod
    def metrics(model: nn.Module, masks: Masks, target: float) -> dict[str, float]:
        """``prune/sparsity`` (of the prunable weights), its target, and the sparsity of each masked tensor."""
        metrics = {"prune/sparsity": sparsity(model, masks), "prune/target_sparsity": target}
        metrics.update({f"prune/sparsity/{k}": 1 - m.float().mean().item() for k, m in masks.items()})
        return metrics
