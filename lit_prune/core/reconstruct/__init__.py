"""Data-driven channel pruning by output reconstruction: ThiNet and He et al.'s channel pruning.

Both methods choose the channels of a group by the layer that *reads* them (the group's consumer:
the next conv, or a Linear after a flatten), keeping the input channels that best reconstruct the
consumer's output on training images, and then refit the consumer's weights on the kept channels.

* **ThiNet** (Luo, Wu, Lin, ICCV 2017; docs/paper-settings.md §4.2): for random output positions and one random
  output channel ``c`` per sample, ``xhat_j`` is input channel ``j``'s contribution to that output, so
  ``y = sum_j xhat_j``. Channels are removed greedily, each time the one whose removal adds the least
  squared error, then every kept input slice of the consumer is rescaled by least squares.
* **Channel pruning** (He, Zhang, Sun, ICCV 2017; docs/paper-settings.md §5.2): ``Z_i`` is channel ``i``'s
  contribution to *all* outputs at the sampled positions; a LASSO on the coefficients ``beta_i`` of the
  flattened ``Z_i``, with ``alpha`` found by binary search, selects the channels, and the consumer's
  weights on them are refitted by least squares against targets ``Y`` (from the original network when
  one is given, so that errors do not accumulate layer after layer).

**Statistics, not samples.** Every quantity both methods need is a sum of outer products over the
samples (:class:`GramStats`, float64):

* ThiNet: ``G = Xhat^T Xhat`` (C x C). The greedy objective for a removed set T is
  ``sum_samples (sum_{t in T} xhat_t)^2 = 1_T^T G 1_T``, and the rescaling solves
  ``(G_SS) w = (Xhat^T y)_S`` -- with ``Xhat^T y = G 1`` since ``y`` is the sum of the contributions.
* Channel pruning: the patch Gram ``H = X^T X`` ((C k) x (C k), one row per input channel and kernel tap)
  and ``B = X^T Y`` ((C k) x n). The LASSO's quadratic form follows from them and the consumer's weights
  W (n x C x k): ``(Z^T Z)_ij = <W_i^T W_j, H_ij>`` and ``(Z^T Y)_i = <W_i, B_i^T>``; the final least
  squares of W' on the kept channels S uses the sub-blocks ``H_SS`` and ``B_S``.

Their size does not depend on the number of samples, so memory stays flat however many images are used,
and under data parallelism each process sums its own images and one all-reduce (``reduce_fn``, a sum)
gives every process the same statistics -- no raw samples are gathered.

Sampling: the consumer's input is captured by a forward pre-hook (the rest of the forward pass is
skipped), ``positions_per_image`` distinct output positions per image are drawn with a seeded
:class:`torch.Generator` (every position when the map is smaller), and only the receptive fields at
those positions are gathered -- never a full ``unfold`` of the feature map. A Linear consumer reading
``C`` channels of ``r`` columns each (after a flatten) gives one sample per image with ``k = r``.

Everything here is plain PyTorch (NumPy for the coordinate descent); the Lightning callbacks
(``callbacks.ThiNetPruning``, ``callbacks.ChannelPruning``) drive it layer by layer.

One module per concern; every name is importable from this package:

* :mod:`.stats` -- :class:`GramStats`, the sufficient statistics, and ``ReduceFn``;
* :mod:`.capture` -- the inputs of submodules (forward pre-hooks; the forward stops there);
* :mod:`.sampling` -- seeded output positions and the receptive fields at them;
* :mod:`.structure` -- the model-structure queries: :class:`ConsumerView` (one per group), the residual
  block a consumer ends (:class:`lit_prune.core.protocols.ResidualBlock`), channel samplers;
* :mod:`.thinet` -- ThiNet's statistics, greedy removal and rescaling;
* :mod:`.lasso` -- the LASSO and its alpha search; :mod:`.regression` -- channel pruning's patch
  statistics and least squares;
* :mod:`.driver` -- one group at a time (:func:`thinet_group`, :func:`channel_pruning_group`) and
  :func:`apply_reconstruction`.
"""

from lit_prune.core.reconstruct.capture import input_of, inputs_of
from lit_prune.core.reconstruct.driver import (
    Reconstruction,
    apply_reconstruction,
    channel_pruning_group,
    thinet_group,
)
from lit_prune.core.reconstruct.lasso import lasso, lasso_select
from lit_prune.core.reconstruct.regression import (
    collect_regression_stats,
    least_squares_weight,
    regression_error,
    regression_lasso_problem,
)
from lit_prune.core.reconstruct.sampling import extract_patches, sample_positions
from lit_prune.core.reconstruct.stats import GramStats, ReduceFn
from lit_prune.core.reconstruct.structure import (
    ConsumerView,
    add_channel_samplers,
    branch_affine,
    consumer_of,
    residual_block_of,
)
from lit_prune.core.reconstruct.thinet import (
    collect_thinet_stats,
    thinet_contributions,
    thinet_error,
    thinet_greedy,
    thinet_scales,
)

__all__ = [
    "ConsumerView",
    "GramStats",
    "Reconstruction",
    "ReduceFn",
    "add_channel_samplers",
    "apply_reconstruction",
    "branch_affine",
    "channel_pruning_group",
    "collect_regression_stats",
    "collect_thinet_stats",
    "consumer_of",
    "extract_patches",
    "input_of",
    "inputs_of",
    "lasso",
    "lasso_select",
    "least_squares_weight",
    "regression_error",
    "regression_lasso_problem",
    "residual_block_of",
    "sample_positions",
    "thinet_contributions",
    "thinet_error",
    "thinet_greedy",
    "thinet_group",
    "thinet_scales",
]
