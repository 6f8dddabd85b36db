"""Parameters that a pruning method updates itself, so the training optimizer must leave them alone.

Sparse Structure Selection's block factors get their own proximal (APG) step and no weight decay: the
method calls :func:`update_outside_optimizer` on them before the optimizer exists, and a LightningModule's
``configure_optimizers`` builds its optimizer over :func:`optimizer_parameters` (ImageClassifier does).
A parameter keeps the mark when the model is copied (``copy.deepcopy``).
"""

from __future__ import annotations

from torch import nn

_MARK = "_lit_prune_updated_by_method"


def update_outside_optimizer(param: nn.Parameter) -> None:
    """Mark ``param`` as updated by a pruning method, not by the training optimizer."""
    setattr(param, _MARK, True)


def is_updated_outside_optimizer(param: nn.Parameter) -> bool:
    return bool(getattr(param, _MARK, False))


def optimizer_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that the training optimizer updates (all but the marked ones)."""
    return [p for p in module.parameters() if not is_updated_outside_optimizer(p)]
