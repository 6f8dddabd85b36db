"""Channel pruning by LASSO selection and least-squares reconstruction (He, Zhang, Sun, "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017, arXiv:1707.06168).

Layer by layer, shallow to deep (docs/paper-settings.md §5.2): for the channels that layer i+1 reads, sample random
output positions of layer i+1 on training images. The inputs X come from the *current* network (already
pruned up to here), the targets Y from a frozen copy of the *original* network, so errors do not accumulate.
A LASSO on one coefficient per input channel (each channel's contribution ``Z_i`` to all outputs, flattened)
selects the channels; its alpha is found by binary search until between c' and 1.1 c' coefficients are
non-zero (He et al.'s window; bracketed from above, see :func:`lit_prune.core.reconstruct.lasso_select`) and
exactly c' channels are kept (largest |beta|). Layer i+1's weights on them are then refitted by least
squares, and layer i's filters (with BN) and layer i+1's input slices are removed physically. Everything is
computed from Gram statistics of the samples (:mod:`lit_prune.core.reconstruct`): He et al.'s code
subsamples 400 rows for its sklearn LASSO; here the quadratic form of all samples costs the same.

ResNets (docs/paper-settings.md §5.2 step 5): only conv1 and conv2 of each bottleneck are pruned (their groups; the
block output meets the shortcut). With ``channel_sampler: true`` every block also gets a channel sampler:
a channel selection in front of its first conv, chosen by the same LASSO with conv1 as the consumer (the
shortcut still reads every channel), as in ResNet-50-2x (``target: 2x`` brings its counts). When the
consumer is the last conv of a residual branch, its target is ``Y1 + Y2 - Y2'`` (``shortcut_compensation``,
on by default): the original branch output plus the original shortcut minus the pruned network's shortcut,
so the refitted branch also makes up for the error that earlier layers left on the residual stream.
Fine-tuning between layers is optional (``finetune_steps``); He et al. fine-tune once at the end: fine-tune
the artifact afterwards (the paper's "fine-tuned" regime).

YAML (VGG-16 -> VGG-16-5x at the end of training)::

    trainer:
      callbacks:
        - class_path: callbacks.ChannelPruning
          init_args:
            target: 5x
            num_images: 5000
            positions_per_image: 10

Prune a trained checkpoint instead::

    python -m lit_prune.prune --checkpoint runs/vgg16/last.ckpt --config cp.yaml \\
        --data-config configs/imagenet/vgg16.yaml --out vgg16_5x.pt
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lit_prune.callbacks.reconstruction import ReconstructionPruning
from lit_prune.methods.channel_pruning import RegressionReconstruction


class ChannelPruning(ReconstructionPruning):
    """He et al.'s channel pruning: LASSO channel selection, then least-squares reconstruction of the next layer.

    Args:
        rank_tol: the search stops once the non-zero count lies in [c', c' (1 + rank_tol)] (He et al.: 0.1).
        channel_sampler: add a channel selection in front of each residual block's first conv and prune it
            too (ImageNet ResNets of the zoo only; the 2x configuration). Their keep counts come from ``target``
            or ``prune_ratio`` (a single ratio applies to them too; a pattern such as ``"*.select"`` addresses
            them alone).
        shortcut_compensation: reconstruct the last conv of a residual branch against ``Y1 + Y2 - Y2'``
            (docs/paper-settings.md §5.2 step 5) instead of the original branch output ``Y1`` alone.
        **kwargs: the arguments of :class:`~callbacks.reconstruction.ReconstructionPruning` (``target`` or
            ``prune_ratio``, ``layers``, ``skip``, ``num_images``, ``positions_per_image``, ``seed``,
            ``batch_size``, ``ridge``, ``finetune_steps``, ``finetune_lr``, ``finetune_weight_decay``,
            ``artifact_path``).
    """

    def __init__(
        self, rank_tol: float = 0.1, channel_sampler: bool = False, shortcut_compensation: bool = True, **kwargs: Any
    ) -> None:
        self._regression = {"rank_tol": rank_tol, "channel_sampler": channel_sampler,
                            "shortcut_compensation": shortcut_compensation}
        super().__init__(**kwargs)

    @override
    def build(self, args: dict[str, Any]) -> RegressionReconstruction:
        return RegressionReconstruction(**args, **self._regression)
