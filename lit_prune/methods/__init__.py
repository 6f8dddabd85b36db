"""What pruning methods share, as plain PyTorch (no Lightning): the pruning state and the width plan.

The Lightning callbacks (:mod:`lit_prune.callbacks`) hold a :class:`~lit_prune.methods.state.PruneState`
and resolve their widths through one :class:`~lit_prune.methods.plan.WidthPlan`.
"""

from lit_prune.methods.plan import WidthPlan, target_group_sizes
from lit_prune.methods.state import Counts, PruneState, checkpoint_states

__all__ = ["Counts", "PruneState", "WidthPlan", "checkpoint_states", "target_group_sizes"]
