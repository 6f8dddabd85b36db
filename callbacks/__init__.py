"""Pruning methods as Lightning callbacks; attach them to any Trainer (Python or ``trainer.callbacks``)."""

from callbacks.base import PruningCallback
from callbacks.l1_norm import L1FilterPruning

__all__ = ["L1FilterPruning", "PruningCallback"]
