"""The Lightning side of the data-driven, layer-by-layer methods (ThiNet, He et al.'s channel pruning): their YAML
arguments, and the hook that prunes when training ends, from the trainer's training data. How the walk samples
images, refits each layer, fine-tunes between layers and stays identical across DDP ranks is described in
:mod:`lit_prune.methods.reconstruction`.
"""


from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, unwrap
from lit_prune.methods.reconstruction import LayerwiseReconstruction


class ReconstructionPruning(PruningCallback):
    """Base class of :class:`~callbacks.ThiNetPruning` and :class:`~callbacks.ChannelPruning`.

    Subclasses implement :meth:`reconstruct_group` (one group's decision) and may override
    :meth:`reference` (a frozen copy of the unpruned network for the targets).

    Args:
        target: name of a width config of the model (``"thinet_conv"``, ``"5x"``, ``"thinet70"``): the keep
            counts are that architecture's widths, layer by layer.
        prune_ratio: fraction of channels removed, one number for every selected layer or a mapping from
            layer name patterns to fractions; ``num_keep = int(C * (1 - ratio))`` (ThiNet-70 keeps 70%:
            ``prune_ratio: 0.3``).
        layers: layer name patterns that may be pruned (default: every group with one conv or linear consumer).
        skip: layer name patterns left whole.
        num_images: training images sampled (the first of a permutation seeded by ``seed``), over all ranks.
        positions_per_image: output positions sampled per image and layer (both papers use 10).
        seed: seed of the image permutation and of the position sampling.
        batch_size: images per forward pass while sampling; None uses the train loader's batch size.
        ridge: relative ridge of the least-squares refits (towards the unrefitted weights).
        finetune_steps: SGD steps (batches per rank) of fine-tuning after each pruned layer; 0 (default) prunes
            every layer without fine-tuning in between (fine-tune the artifact afterwards).
        finetune_lr: learning rate of those steps (ThiNet: 0.001).
        finetune_weight_decay: their weight decay.
        round_to: round each width from ``prune_ratio`` up to a multiple of this (1: off, as in the papers).
        artifact_path: where the artifact is written (relative to the trainer's log directory); None writes none.

    Exactly one of ``target`` and ``prune_ratio`` is given.
    """

    #: nothing is masked during training: the method prunes once, at the end
    enforce_masks = False

    def __init__(
        self,
        target: str | None = None,
        prune_ratio: float | dict[str, float] | None = None,
        layers: list[str] | None = None,
        skip: list[str] | None = None,
        num_images: int = 5000,
        positions_per_image: int = 10,
        seed: int = 0,
        batch_size: int | None = None,
        ridge: float = 1e-4,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        finetune_weight_decay: float = 1e-4,
        artifact_path: str | None = "pruned.pt",
        round_to: int = 1,
    ) -> None:
        super().__init__(artifact_path)
        self.pruner = self.build({
            "target": target, "prune_ratio": prune_ratio, "layers": layers, "skip": skip, "num_images": num_images,
            "positions_per_image": positions_per_image, "seed": seed, "batch_size": batch_size, "ridge": ridge,
            "finetune_steps": finetune_steps, "finetune_lr": finetune_lr,
            "finetune_weight_decay": finetune_weight_decay, "round_to": round_to,
        })

    def build(self, args: dict[str, Any]) -> LayerwiseReconstruction:
        """The method, from the common arguments (each subclass builds its own)."""
        raise NotImplementedError

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(unwrap(pl_module), trainer=trainer, dataloader=trainer.train_dataloader)

    @property
    def results(self) -> list[dict[str, Any]]:
        """One entry per pruned layer of the last :meth:`prune`: kept/total, errors, samples."""
        return self.pruner.results

    @override
    def settings(self) -> dict[str, Any]:
        # the constructor arguments (seed, num_images, positions_per_image, ...) and what the sampling gave
        return {**super().settings(), "layer_results": self.results}
