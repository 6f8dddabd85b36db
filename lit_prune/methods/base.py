"""The one protocol of every pruning method: ``decide(model, ctx) -> Decision``, in plain PyTorch.

A method looks at a trained network (and, for data-driven methods, at training images) and decides what to
remove. It never touches Lightning, files or loggers: the Lightning adapter
(:class:`lit_prune.callbacks.base.PruningCallback`) builds the :class:`Context` from the Trainer, shares rank
0's decision across ranks, applies it to a copy, logs it and writes the artifact. So a new method is one
:class:`PruningMethod` subclass and a callback of a few lines that passes it its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lit_prune.core.masks import Masks


def _identity(obj: Any) -> Any:
    return obj


@dataclass
class Context:
    """What a method may use besides the model.

    Attributes:
        dataloader: training images (a DataLoader or a dataset), for methods with ``needs_data``.
        rank: this process's global rank; ``world_size`` the number of processes.
        reduce: sums a tensor over all ranks (None outside DDP): data-driven methods all-reduce their statistics.
        broadcast: rank 0's object on every rank (identity outside DDP).
        log: ``log(metrics)`` records numbers (rank 0 writes them to the run's logger).
    """

    dataloader: Any = None
    rank: int = 0
    world_size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    broadcast: Callable[[Any], Any] = _identity
    log: Callable[[dict[str, float]], None] = lambda metrics: None


@dataclass
class Decision:
    """What a method decided for one model.

    Attributes:
        keeps: ``{group name: bool keep vector}`` of the channel groups to shrink physically.
        masks: ``{parameter name: bool mask}`` the pruned model keeps enforced (masked methods).
        pruned: the pruned network, when the method built it itself (it refits weights or removes blocks);
            ``keeps`` then only describe what went, for the logs.
        summary: a one-line description of what was removed (None: the adapter writes one from ``keeps``).
        metrics: method-specific numbers for the logs (``prune/...``).
    """

    keeps: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: Masks = field(default_factory=dict)
    pruned: nn.Module | None = None
    summary: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def cpu(self) -> Decision:
        """The same decision with every tensor on the CPU (what is broadcast and stored)."""
        return Decision(keeps={k: v.cpu() for k, v in self.keeps.items()},
                        masks={k: v.cpu() for k, v in self.masks.items()},
                        pruned=self.pruned, summary=self.summary, metrics=dict(self.metrics))


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite weights: no criterion can rank them, and the artifact would carry them.

    Raises:
        ValueError: naming the first non-finite parameter or buffer and how many of its values are bad.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} has {bad} NaN or infinite values of {t.numel()}: the model has diverged (or its "
                             "checkpoint is corrupted); prune a checkpoint from before the divergence")


class PruningMethod:
    """Base of the methods: a name, whether it needs data, and :meth:`decide`."""

    #: the method's name in artifacts and logs
    name: ClassVar[str] = "pruning"
    #: whether :meth:`decide` needs training images (``ctx.dataloader``)
    needs_data: ClassVar[bool] = False

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        """What to remove from ``model``; ``model`` itself is left as it is."""
        raise NotImplementedError(f"{type(self).__name__} makes no one-shot decision")
