"""Plumbing shared by the pruning callbacks: mask enforcement, checkpoint state, DDP-safe export."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_prune.artifact import make_artifact, save_artifact
from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.masks import Masks, apply_masks, mask_gradients
from lit_prune.core.surgery import prune_groups
from lit_prune.models import create_model

log = logging.getLogger(__name__)


def is_zoo_model(model: nn.Module) -> bool:
    """Whether ``model`` was built by ``lit_prune.models.create_model``, so an artifact can describe it."""
    return hasattr(model, "zoo_name") and hasattr(model, "arch_kwargs")


def target_group_sizes(model: nn.Module, target: str) -> dict[str, int]:
    """Channels per group of ``model`` under its family's named width config ``target`` (e.g. ``"B"``).

    The target architecture is built and its groups matched to ``model``'s by name; a group missing from
    it (a residual branch the target drops) is absent from the result.
    """
    if not is_zoo_model(model):
        raise ValueError("target needs a zoo model (built with create_model); use prune_ratio otherwise")
    kwargs = {k: v for k, v in model.zoo_kwargs.items() if k not in ("cfg", "select")}  # the target brings its own
    built = create_model(model.zoo_name, cfg=target, **kwargs)
    return {g.name: group_size(built, g) for g in channel_groups(built)}


def unwrap(pl_module: pl.LightningModule) -> nn.Module:
    """The network inside a LightningModule (``pl_module.model`` for ours, else the module itself)."""
    return getattr(pl_module, "model", pl_module)


class PruningCallback(pl.Callback):
    """Base class: owns the masks, keeps them enforced, saves them in checkpoints, writes the artifact.

    Subclasses decide *what* to prune; this class makes sure that:

    * masked weights stay zero: gradients are masked in ``on_before_optimizer_step`` and weights and
      momentum re-masked after every optimizer step (when ``enforce_masks`` is True);
    * ``fit(ckpt_path=...)`` resumes with the same masks and schedule state (``state_dict``);
    * under DDP every rank holds rank 0's decision (``broadcast``) and only rank 0 writes files.

    * with ``keep_init``, the initialisation theta_0 is saved before the first step, kept in checkpoints
      (a resumed run still knows the true theta_0) and written into the artifact (lottery tickets).

    Args:
        artifact_path: where the pruned artifact is written; a relative path is resolved against the
            trainer's log directory. None writes no artifact.
        keep_init: save theta_0 for lottery-ticket rewinding.
    """

    enforce_masks: bool = True

    def __init__(self, artifact_path: str | None = "pruned.pt", keep_init: bool = False) -> None:
        self.artifact_path = artifact_path
        self.keep_init = keep_init
        self.masks: Masks = {}
        self.dense_counts: dict[str, int] | None = None
        self.init_state: dict[str, torch.Tensor] | None = None
        self.written: str | None = None

    # ---- state -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()}, "dense_counts": self.dense_counts,
                "init_state": self.init_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict.get("masks", {}))
        self.dense_counts = state_dict.get("dense_counts")
        self.init_state = state_dict.get("init_state")

    # ---- mask enforcement --------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a checkpoint restore: a resumed run keeps the theta_0 and counts it saved.
        model = unwrap(pl_module)
        if self.dense_counts is None:
            report = count_flops(model)
            self.dense_counts = {"macs": report.macs, "params": report.params}
        if self.keep_init and self.init_state is None:
            self.init_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks and self.enforce_masks:  # restored from a checkpoint: re-impose before any step
            apply_masks(unwrap(pl_module), self.masks, trainer.optimizers[0] if trainer.optimizers else None)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.masks and self.enforce_masks:
            mask_gradients(unwrap(pl_module), self.masks)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.masks and self.enforce_masks:
            apply_masks(unwrap(pl_module), self.masks, trainer.optimizers[0] if trainer.optimizers else None)

    # ---- one-shot pruning ---------------------------------------------------------------------------
    method: str = "pruning"

    def select(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keep vectors ``{group name: bool tensor}`` for ``model`` (implemented by one-shot methods)."""
        raise NotImplementedError(f"{type(self).__name__} has no one-shot selection")

    def settings(self) -> dict[str, Any]:
        """The constructor arguments, recorded in the artifact's provenance."""
        plain = (str, int, float, bool, list, tuple, dict, type(None))
        state = ("masks", "dense_counts", "written")
        return {k: v for k, v in vars(self).items() if k[0] != "_" and k not in state and isinstance(v, plain)}

    def prune(
        self, model: nn.Module, *, trainer: pl.Trainer | None = None, path: str | None = None,
        source: str | None = None, init_state: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Select on rank 0, share the decision, export the physically pruned copy as an artifact.

        A model outside the zoo is pruned in place instead and None is returned (see :meth:`export`).

        ``init_state`` (theta_0 of a lottery-ticket run, e.g. carried by a source artifact) is written
        into the artifact when the callback keeps none of its own.
        """
        keeps = self.broadcast(trainer, self.select(model))
        return self.export(model, keeps, trainer=trainer, method=self.method, settings=self.settings(),
                           path=path, source=source, init_state=init_state)

    # ---- helpers for subclasses --------------------------------------------------------------------
    @staticmethod
    def broadcast(trainer: pl.Trainer | None, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity without a trainer or outside DDP)."""
        if trainer is None or trainer.world_size == 1:
            return obj
        return trainer.strategy.broadcast(obj, src=0)

    def set_masks(self, trainer: pl.Trainer | None, model: nn.Module, masks: Masks, optimizer=None) -> None:
        """Adopt rank 0's masks and apply them (weights and momentum)."""
        self.masks = self.broadcast(trainer, {k: v.cpu() for k, v in masks.items()})
        apply_masks(model, self.masks, optimizer)

    def resolve_path(self, trainer: pl.Trainer | None, path: str | None = None) -> Path | None:
        path = path if path is not None else self.artifact_path
        if path is None:
            return None
        p = Path(path)
        if not p.is_absolute() and trainer is not None:
            p = Path(trainer.log_dir or trainer.default_root_dir) / p
        return p

    def export(
        self,
        model: nn.Module,
        keeps: Mapping[str, torch.Tensor],
        *,
        trainer: pl.Trainer | None = None,
        method: str,
        settings: Mapping[str, Any],
        masks: Masks | None = None,
        path: str | None = None,
        source: str | None = None,
        init_state: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Prune a *copy* of ``model`` physically, log the result, and write the artifact on rank 0.

        With no ``keeps`` nothing is removed physically: the artifact is the full-size model with its
        ``masks`` (unstructured and other masked methods). The live model is left untouched, so the
        trainer can still test or checkpoint it.

        A model outside the zoo (a user's own network, whose groups are traced) cannot be described as
        an artifact: it is pruned (and masked) *in place* instead, with a warning, and nothing is written.

        Returns:
            The artifact, or None for a model outside the zoo.
        """
        if not is_zoo_model(model):
            self._prune_in_place(model, keeps, trainer=trainer, masks=masks)
            return None
        pruned = copy.deepcopy(model)
        if keeps:
            prune_groups(pruned, keeps)
        if masks:
            apply_masks(pruned, masks)
        if self.dense_counts is None:
            report = count_flops(model)  # dense count: zeros of masked weights are counted too
            self.dense_counts = {"macs": report.macs, "params": report.params}
        init = self.init_state if self.init_state is not None else init_state
        art = make_artifact(pruned, method=method, settings=settings, source=source, dense=self.dense_counts,
                            masks=masks, init_state=init)
        self._log_export(trainer, keeps, art)
        target = self.resolve_path(trainer, path)
        if target is not None:
            if trainer is None or trainer.is_global_zero:
                save_artifact(art, target)
                rank_zero_info(f"pruned artifact written to {target}")
            if trainer is not None:
                trainer.strategy.barrier("lit_prune_export")
            self.written = str(target)
        return art

    def _prune_in_place(
        self, model: nn.Module, keeps: Mapping[str, torch.Tensor], *, trainer: pl.Trainer | None, masks: Masks | None
    ) -> None:
        """Apply the decision to the live ``model`` itself: its only record, as no artifact can describe it.

        Every rank holds the same broadcast ``keeps``, so every replica changes alike.
        """
        if self.dense_counts is None:
            report = count_flops(model)
            self.dense_counts = {"macs": report.macs, "params": report.params}
        rank_zero_warn(
            f"{type(self).__name__}: {type(model).__name__} is not a zoo model (lit_prune.models.create_model), so "
            "no artifact is written; the model itself is pruned in place (its checkpoints hold the dense weights)"
        )
        if keeps:
            prune_groups(model, keeps)
        if masks:
            apply_masks(model, masks)
        report = count_flops(model, nonzero=True)
        pruned = {"macs": report.macs, "params": report.params}
        ratio = self.dense_counts["macs"] / max(pruned["macs"], 1)
        flops = {"dense": self.dense_counts, "pruned": pruned, "ratio": ratio}
        self._log_export(trainer, keeps, {"flops": flops, "masks": dict(masks or {})})

    def _log_export(
        self, trainer: pl.Trainer | None, keeps: Mapping[str, torch.Tensor], art: Mapping[str, Any]
    ) -> None:
        f = art["flops"]
        metrics = {
            "prune/macs_dense": f["dense"]["macs"], "prune/macs_pruned": f["pruned"]["macs"],
            "prune/params_dense": f["dense"]["params"], "prune/params_pruned": f["pruned"]["params"],
            "prune/flops_ratio": f["ratio"],
        }
        extra, what = self.export_summary(keeps, art)
        metrics.update(extra)
        if trainer is not None and trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"{what}: {f['pruned']['macs']:,} / {f['dense']['macs']:,} MACs (ratio {f['ratio']:.3f}), "
            f"{f['pruned']['params']:,} / {f['dense']['params']:,} params"
        )

    def export_summary(
        self, keeps: Mapping[str, torch.Tensor], art: Mapping[str, Any]
    ) -> tuple[dict[str, float], str]:
        """Method-specific metrics and a one-line description of what the export removed."""
        kept = sum(int(k.sum()) for k in keeps.values())
        total = sum(k.numel() for k in keeps.values())
        if not total:
            return {}, f"pruned ({len(art['masks'])} masked tensors)"
        metrics = {"prune/channel_sparsity": 1 - kept / total}
        metrics.update({f"prune/kept/{name}": int(k.sum()) for name, k in keeps.items()})
        return metrics, f"pruned ({kept}/{total} channels kept)"
