"""ThiNet (Luo, Wu, Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression", ICCV 2017,
arXiv:1707.06342).

Layer by layer, shallow to deep (docs/paper-settings.md §4.2): the filters of layer i are chosen by layer i+1. On
training
images, sample random output positions of layer i+1 and one random output channel per sample; input channel
j's contribution ``xhat_j`` to that output sums to the output itself. Greedily remove the channels whose
summed contributions have the smallest energy, rescale each kept input slice of layer i+1 by least squares,
then remove layer i's filters (with their BN) and layer i+1's input slices physically. The statistics are
Gram matrices (C x C), not samples: see :mod:`lit_prune.core.reconstruct`.

ThiNet fine-tunes briefly after each layer (about an epoch at lr 0.001) and longer at the end:
``finetune_steps`` / ``finetune_lr`` give the short fine-tunes (off by default); the final one is the
paper's "fine-tuned" regime, run on the artifact.

The paper's targets are named width configs: VGG-16 ThiNet-Conv (conv1_1 ... conv4_3 halved, conv5 and the
FC layers whole) and ResNet-50 ThiNet-30/50/70 (conv1 and conv2 of every bottleneck; the block output and
the residual stream keep their width).

YAML (VGG-16 -> ThiNet-Conv at the end of training)::

    trainer:
      callbacks:
        - class_path: callbacks.ThiNetPruning
          init_args:
            target: thinet_conv
            num_images: 5000

Generic form (ResNet-50 ThiNet-70 spelled out: every bottleneck's conv1 and conv2 keep 70%)::

        - class_path: callbacks.ThiNetPruning
          init_args: {prune_ratio: 0.3, positions_per_image: 10, seed: 0}

Prune a trained checkpoint instead (``--data-config`` names the datamodule, e.g. the training config)::

    python -m lit_prune.prune --checkpoint runs/vgg16/last.ckpt --config thinet.yaml \\
        --data-config configs/imagenet/vgg16.yaml --out thinet_conv.pt
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lit_prune.callbacks.reconstruction import ReconstructionPruning
from lit_prune.methods.thinet import ThiNetReconstruction


class ThiNetPruning(ReconstructionPruning):
    """ThiNet: greedy channel removal by the next layer's reconstruction error, then least-squares rescaling.

    Arguments are those of :class:`~lit_prune.callbacks.reconstruction.ReconstructionPruning` (``target`` or
    ``prune_ratio``, ``layers``, ``skip``, ``num_images``, ``positions_per_image``, ``seed``, ``batch_size``,
    ``ridge``, ``finetune_steps``, ``finetune_lr``, ``finetune_weight_decay``, ``artifact_path``). Each layer's
    statistics come from the current, already pruned (and, with ``finetune_steps``, fine-tuned) network.
    """

    @override
    def build(self, args: dict[str, Any]) -> ThiNetReconstruction:
        return ThiNetReconstruction(**args)
