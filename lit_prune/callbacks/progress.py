"""One line per epoch: what a run is doing when no progress bar is shown (logs, the protocol runner's console).

    epoch 3/10 | train/loss 0.5121 | val/loss 0.4810 | val/acc1 91.23% | lr 0.01 | 12.3 s/epoch | ETA 1 min 26 s

Written by global rank 0 through Lightning's logger, so it lands in a stage's ``stage.log``; the runner echoes
these lines under the stage's own line. The line starts with :data:`PREFIX` so that it can be found.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

#: how every progress line starts
PREFIX = "epoch "


def duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min 3 s"``, ``"2 h 5 min"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class EpochProgress(pl.Callback):
    """Log one line per training epoch on rank 0: losses, validation accuracy, learning rate, time and ETA.

    Args:
        enabled: False writes nothing (the progress bar alone).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._start: float | None = None
        self._lr: float | None = None
        self._durations: list[float] = []

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        # the epoch's LR: by the epoch's end, an epoch-interval scheduler has already stepped to the next one
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook: its metrics are in callback_metrics.
        if not self.enabled or self._start is None or trainer.sanity_checking:
            return
        self._durations.append(time.monotonic() - self._start)
        rank_zero_info(self.line(trainer))

    def line(self, trainer: pl.Trainer) -> str:
        """The progress line of the epoch that just ended."""
        metrics = trainer.callback_metrics
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        parts = [f"{PREFIX}{epoch}/{total if total and total > 0 else '?'}"]
        for key, fmt in (("train/loss_epoch", "train/loss {:.4f}"), ("val/loss", "val/loss {:.4f}"),
                         ("val/acc1", "val/acc1 {:.2%}")):
            value = metrics.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                parts.append(fmt.format(float(value)))
        if self._lr is not None:
            parts.append(f"lr {self._lr:.3g}")
        per_epoch = sum(self._durations[-3:]) / len(self._durations[-3:])  # the recent pace
        parts.append(f"{per_epoch:.1f} s/epoch")
        if total and total > 0:
            parts.append(f"ETA {duration(per_epoch * (total - epoch))}")
        return " | ".join(parts)
