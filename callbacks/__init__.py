"""Pruning methods as Lightning callbacks; attach them to any Trainer (Python or ``trainer.callbacks``)."""

from callbacks.base import PruningCallback
from callbacks.l1_norm import L1FilterPruning
from callbacks.magnitude import MagnitudePruning
from callbacks.sfp import SoftFilterPruning
from callbacks.slimming import NetworkSlimming

__all__ = ["L1FilterPruning", "MagnitudePruning", "NetworkSlimming", "PruningCallback", "SoftFilterPruning"]
