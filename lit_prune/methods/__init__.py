"""The pruning methods as plain PyTorch (no Lightning), and what they share.

Every method is a :class:`~lit_prune.methods.base.PruningMethod` whose ``decide(model, ctx)`` returns a
:class:`~lit_prune.methods.base.Decision` (channels to remove, masks to keep, or the pruned network it built).
The Lightning callbacks (:mod:`lit_prune.callbacks`) pass them their arguments, call them at the right time,
and hold their :class:`~lit_prune.methods.state.PruneState`; structured methods resolve their widths through
one :class:`~lit_prune.methods.plan.WidthPlan`.

    filter_norm.py      L1/L2 filter pruning (Li et al.)
    slimming.py         Network Slimming's BN-scale sparsity and global threshold
    magnitude.py        unstructured magnitude masks, one-shot or gradual
    sfp.py              Soft Filter Pruning's per-conv selection
    sss.py              Sparse Structure Selection's APG step and block removal
    reconstruction.py   the layer-by-layer walk of the data-driven methods; thinet.py, channel_pruning.py
"""

from lit_prune.methods.base import Context, Decision, PruningMethod
from lit_prune.methods.plan import WidthPlan, target_group_sizes
from lit_prune.methods.state import Counts, PruneState, checkpoint_states

__all__ = ["Context", "Counts", "Decision", "PruneState", "PruningMethod", "WidthPlan", "checkpoint_states",
           "target_group_sizes"]
