"""Pruning methods as Lightning callbacks; attach them to any Trainer (Python or ``trainer.callbacks``)."""

from lit_prune.callbacks.base import PruningCallback
from lit_prune.callbacks.channel_pruning import ChannelPruning
from lit_prune.callbacks.l1_norm import L1FilterPruning
from lit_prune.callbacks.magnitude import MagnitudePruning
from lit_prune.callbacks.progress import EpochProgress
from lit_prune.callbacks.sfp import SoftFilterPruning
from lit_prune.callbacks.slimming import NetworkSlimming
from lit_prune.callbacks.sss import SparseStructureSelection
from lit_prune.callbacks.thinet import ThiNetPruning

__all__ = [
    "ChannelPruning",
    "EpochProgress",
    "L1FilterPruning",
    "MagnitudePruning",
    "NetworkSlimming",
    "PruningCallback",
    "SoftFilterPruning",
    "SparseStructureSelection",
    "ThiNetPruning",
]
