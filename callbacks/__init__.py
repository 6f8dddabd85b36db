"""Pruning methods as Lightning callbacks; attach them to any Trainer (Python or ``trainer.callbacks``)."""

from callbacks.base import PruningCallback
from callbacks.channel_pruning import ChannelPruning
from callbacks.l1_norm import L1FilterPruning
from callbacks.magnitude import MagnitudePruning
from callbacks.sfp import SoftFilterPruning
from callbacks.slimming import NetworkSlimming
from callbacks.sss import SparseStructureSelection
from callbacks.thinet import ThiNetPruning

__all__ = [
    "ChannelPruning",
    "L1FilterPruning",
    "MagnitudePruning",
    "NetworkSlimming",
    "PruningCallback",
    "SoftFilterPruning",
    "SparseStructureSelection",
    "ThiNetPruning",
]
