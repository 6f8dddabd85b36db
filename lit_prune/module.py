"""The LightningModule for image classification that every stage of the protocol trains."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lit_prune.core.flops import count_flops
from lit_prune.core.schedule import PiecewiseConstant, milestones_for
from lit_prune.models import architecture, create_model

log = logging.getLogger(__name__)


class ImageClassifier(pl.LightningModule):
    """Any zoo model (or your own ``nn.Module``) trained with the paper's SGD recipes.

    Args:
        arch: registry name of a zoo model (``python -m lit_prune.flops --list``).
        cfg: its width config, or the name of a registered one (``"A"``); None for the unpruned model.
        num_classes: classifier outputs; LightningCLI links it to the datamodule's.
        model_kwargs: further constructor arguments of the zoo model (e.g. ``select``).
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: applied to every parameter (BN included), as the reference code does.
        nesterov: Nesterov momentum (the SFP scripts use it; the others do not).
        schedule: ``"multistep"``, ``"step"`` or ``"constant"``.
        milestones: epochs of the LR changes for ``"multistep"``; default 50% and 75% of
            ``trainer.max_epochs``.
        gamma: LR factor per milestone; a list gives one factor per milestone (SFP: 10, 0.2, 0.2, 0.2).
        step_size: epochs between LR changes for ``"step"``; default a third of ``max_epochs``.
        model: an ``nn.Module`` to train instead of a zoo model (Python use; not saved in hparams).

    YAML::

        model:
          arch: cifar_resnet56
          cfg: B
          lr: 0.1
          weight_decay: 1.0e-4
    """

    def __init__(
        self,
        arch: str | None = "cifar_resnet56",
        cfg: Any = None,
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        schedule: str = "multistep",
        milestones: Sequence[int] | None = None,
        gamma: float | Sequence[float] = 0.1,
        step_size: int | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        milestones_for(schedule, 1, milestones, step_size)  # validates the schedule name early
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            if arch is None:
                raise ValueError("give either arch (a zoo model name) or model (an nn.Module)")
            model = create_model(arch, cfg=cfg, num_classes=num_classes, **(model_kwargs or {}))
        self.model = model
        self.example_input_array = torch.zeros(2, *getattr(model, "input_size", (3, 32, 32)))
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for stage in ("train", "val", "test")
                for k in (1, top5)
            }
        )
        self._topk = (1, top5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test", sync_dist=not on_step)
        for k in self._topk if stage != "train" else (1,):
            metric = self.metrics[f"{stage}_acc{k}"]
            metric(logits.detach(), y)
            self.log(f"{stage}/acc{k}", metric, on_step=False, on_epoch=True, prog_bar=k == 1)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(1)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps = milestones_for(hp.schedule, max_epochs, hp.milestones, hp.step_size)
        gammas = list(hp.gamma) if isinstance(hp.gamma, Sequence) else [hp.gamma] * len(steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PiecewiseConstant(steps, gammas))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self) -> None:
        self._log_model_size()

    @rank_zero_only
    def _log_model_size(self) -> None:
        report = count_flops(self.model, nonzero=True)
        log.info("model: %s MACs, %s parameters", f"{report.macs:,}", f"{report.params:,}")
        if self.logger is not None:
            self.logger.log_metrics({"model/macs": report.macs, "model/params": report.params}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Surgery may have changed the widths since __init__: keep the hyper-parameters describing the
        # weights, so that load_from_checkpoint rebuilds the pruned model without the artifact.
        if hasattr(self.model, "zoo_name"):
            kwargs = dict(architecture(self.model)["kwargs"])
            hp = checkpoint.setdefault("hyper_parameters", {})
            hp["cfg"] = kwargs.pop("cfg", None)
            kwargs.pop("num_classes", None)
            hp["model_kwargs"] = kwargs
