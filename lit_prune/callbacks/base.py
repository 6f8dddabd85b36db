"""Plumbing shared by the pruning callbacks: one pruning state, mask enforcement, DDP-safe export."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_prune.artifact import (
    CHECKPOINT_EDITS,
    Architecture,
    Artifact,
    FlopsSummary,
    flops_summary,
    make_artifact,
    save_artifact,
)
from lit_prune.core.masks import Masks, apply_masks
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.surgery import edits_of, prune_groups
from lit_prune.methods.base import Context, Decision, PruningMethod, check_finite
from lit_prune.methods.state import Counts, PruneState

__all__ = ["PruningCallback", "log_metrics", "unwrap"]

log = logging.getLogger(__name__)

#: constructor arguments that say where files go, not how the method prunes: left out of the provenance
_NOT_SETTINGS = ("self", "artifact_path", "masked_artifact_path")


def unwrap(pl_module: pl.LightningModule) -> nn.Module:
    """The network inside a LightningModule, whose module paths are the layer names every method uses.

    ``pl_module.model`` (ours, and a common convention); else the one child module that holds every
    parameter (a user's ``self.net = torchvision.models.resnet18()``: names are ``layer1.0.conv1``, not
    ``net.layer1.0.conv1``); else the LightningModule itself.
    """
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module):
        return model
    every = {id(p) for p in pl_module.parameters()}  # identities: lazy parameters have no size yet
    holders = [m for m in pl_module.children() if {id(p) for p in m.parameters()} == every]
    return holders[0] if every and len(holders) == 1 else pl_module


def log_metrics(trainer: pl.Trainer | None, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` once, from global rank 0, at the trainer's step (nothing without a logger)."""
    if trainer is not None and trainer.logger is not None and trainer.is_global_zero and metrics:
        trainer.logger.log_metrics(dict(metrics), step=trainer.global_step)


class PruningCallback(pl.Callback):
    """Base class: holds the :class:`~lit_prune.methods.state.PruneState`, keeps its masks enforced, saves it
    in checkpoints and writes the artifact.

    Subclasses decide *what* to prune; this class makes sure that:

    * masked weights stay zero: gradients are masked in ``on_before_optimizer_step`` and weights and
      momentum re-masked after every optimizer step (when ``enforce_masks`` is True);
    * ``fit(ckpt_path=...)`` resumes with the same masks and schedule state (``state_dict``), each instance
      under its own ``state_key``, so two callbacks of one method on a Trainer keep their own state;
    * under DDP every rank holds rank 0's decision (``broadcast``) and only rank 0 writes files;
    * with ``keep_init``, the initialisation theta_0 is saved before the first step, kept in checkpoints
      (a resumed run still knows the true theta_0) and written into the artifact (lottery tickets);
    * the constructor arguments are recorded as they were given (:meth:`settings`), for the provenance;
    * FLOPs are counted at the data's input size: ``trainer.datamodule.input_size`` where the datamodule has
      one, else ``prune(..., input_size=)``, else the network's own ``input_size`` (32x32 without one);
    * a network outside the zoo is pruned in place and written as an artifact of its builder and cuts
      (:class:`lit_prune.artifact.Architecture`); one that cannot be rebuilt from a file is refused when the
      fit starts, before any training, with the fix (or pruned without an artifact: ``artifact_path: null``).

    Args:
        artifact_path: where the pruned artifact is written; a relative path is resolved against the
            trainer's log directory. None writes no artifact.
        keep_init: save theta_0 for lottery-ticket rewinding.
    """

    #: whether the masks are imposed after every optimizer step (soft methods such as SFP set False)
    enforce_masks: bool = True
    #: the method's decision, plain PyTorch (subclasses set it in ``__init__``)
    pruner: PruningMethod = PruningMethod()
    #: whether the method writes its artifact when training ends (slimming and SSS can only train)
    prune_at_end: bool = True

    @property
    def method(self) -> str:
        """The method's name in artifacts and logs."""
        return self.pruner.name

    @property
    def needs_data(self) -> bool:
        """Whether :meth:`prune` needs training images (``dataloader=``): the prune CLI's ``--data-config``."""
        return self.pruner.needs_data

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record the constructor arguments, bound to each __init__'s signature with the defaults filled in:
        # explicit, and never the callback's own state. Each level merges its own after its parent's (which
        # runs inside it), so a subclass's values win and a subclass that forwards **kwargs loses nothing.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self: PruningCallback, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            for name, value in bound.arguments.items():
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    self._settings.update({k: copy.deepcopy(v) for k, v in value.items() if k not in _NOT_SETTINGS})
                elif kind is not inspect.Parameter.VAR_POSITIONAL and name not in _NOT_SETTINGS:
                    self._settings[name] = copy.deepcopy(value)

        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(self, artifact_path: str | None = "pruned.pt", keep_init: bool = False) -> None:
        self.artifact_path = artifact_path
        self.keep_init = keep_init
        self.state = PruneState()
        self.written: str | None = None
        self._settings: dict[str, Any] = {"keep_init": keep_init}

    # ---- the state (views kept for the methods and for callers of earlier versions) ------------------
    @property
    def masks(self) -> Masks:
        return self.state.masks

    @masks.setter
    def masks(self, masks: Masks) -> None:
        self.state.masks = dict(masks)

    @property
    def init_state(self) -> dict[str, torch.Tensor] | None:
        return self.state.init_state

    @property
    def dense_counts(self) -> dict[str, int] | None:
        return self.state.dense.to_dict() if self.state.dense is not None else None

    def settings(self) -> dict[str, Any]:
        """The constructor arguments as given (defaults filled in), recorded in the artifact's provenance."""
        return dict(self._settings)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._settings)  # the constructor arguments only, never results

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A network outside the zoo pruned in place: its hyper-parameters still build the dense one, so the
        # checkpoint records the cuts too (lit_prune.artifact.load_checkpoint replays them before the weights).
        model = unwrap(pl_module)
        if not is_zoo_model(model) and edits_of(model):
            checkpoint[CHECKPOINT_EDITS] = edits_of(model)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores a callback by its exact state_key. A checkpoint of this method saved under
        # another key (an older lit-prune's class-name key, or changed arguments) would silently lose the
        # masks and the schedule: adopt it when it is the only one of this class, and refuse to guess
        # among several.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        name = type(self).__qualname__
        ours = [k for k in states if isinstance(k, str) and (k == name or k.startswith(name + "{"))]
        if len(ours) == 1:
            rank_zero_warn(f"{name}: the checkpoint's state was saved with other arguments ({ours[0]}); "
                           "resuming with its masks and schedule")
            states[self.state_key] = states[ours[0]]
        elif len(ours) > 1:
            raise ValueError(f"the checkpoint holds {len(ours)} {name} states ({', '.join(ours)}) and none with "
                             f"this callback's arguments ({self.state_key}); give the arguments of the run that "
                             "wrote it")

    # ---- mask enforcement --------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a checkpoint restore: a resumed run keeps its dense counts and theta_0.
        model = unwrap(pl_module)
        self.input_size(trainer, model)
        paths = (self.artifact_path, getattr(self, "masked_artifact_path", None))  # SFP writes two
        if self.prune_at_end and any(p is not None for p in paths) and not is_zoo_model(model):
            Architecture.of(model)  # refuse a network no file can rebuild now, not after the training
        self.state.record_dense(lambda: self.dense_of(model))
        if self.keep_init:
            self.state.capture_init(model)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit that took no step (limit_train_batches: 0) never reached on_train_end, where methods prune.
        if trainer.global_step == 0 and self.prune_at_end and self.artifact_path is not None and self.written is None:
            raise ValueError(f"{type(self).__name__} never ran: this fit trained no batch (limit_train_batches: 0?), "
                             "so no artifact was written. Train for at least one batch, or prune a trained checkpoint "
                             "with python -m lit_prune.prune")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enforce_masks:  # restored from a checkpoint: re-impose before any step
            self.state.after_optimizer_step(unwrap(pl_module), _optimizer(trainer))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.enforce_masks:
            self.state.before_optimizer_step(unwrap(pl_module))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.enforce_masks:
            self.state.after_optimizer_step(unwrap(pl_module), _optimizer(trainer))

    # ---- one-shot pruning ---------------------------------------------------------------------------
    def context(self, trainer: pl.Trainer | None, dataloader: Any = None) -> Context:
        """The method's view of the run: data, rank, and the collectives of the Trainer's strategy."""
        log = functools.partial(log_metrics, trainer)
        if trainer is None or trainer.world_size == 1:
            return Context(dataloader=dataloader, log=log)
        return Context(dataloader=dataloader, rank=trainer.global_rank, world_size=trainer.world_size,
                       reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
                       broadcast=functools.partial(self.broadcast, trainer), log=log)

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        """The method's decision for ``model`` (an extension point: the default asks :attr:`pruner`)."""
        return self.pruner.decide(model, ctx)

    def select(self, model: nn.Module, dataloader: Any = None) -> dict[str, torch.Tensor]:
        """The keep vectors ``{group name: bool tensor}`` this method chooses for ``model`` (one process).

        Args:
            model: the trained network (left as it is).
            dataloader: training images, for the methods that declare ``needs_data``.
        """
        return self.decide(model, self.context(None, dataloader)).keeps

    def dense_of(self, model: nn.Module) -> Counts:
        """The counts of the dense model as exported (SSS leaves its block factors out), at the data's size."""
        return Counts.of(model, input_size=self.state.input_size)

    def input_size(self, trainer: pl.Trainer | None, model: nn.Module,
                   given: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
        """(C, H, W) the FLOPs are counted at, recorded with the dense counts: ``given``, else the trainer's
        datamodule's ``input_size``, else the network's own (None: the counter's 32x32 default)."""
        size = given
        if size is None and trainer is not None:
            size = getattr(getattr(trainer, "datamodule", None), "input_size", None)
        if size is None:
            size = getattr(model, "input_size", None)
        return self.state.record_input_size(size)

    def prune(
        self, model: nn.Module, *, trainer: pl.Trainer | None = None, path: str | None = None,
        source: str | None = None, init_state: dict[str, torch.Tensor] | None = None, dataloader: Any = None,
        input_size: tuple[int, ...] | None = None,
    ) -> Artifact | None:
        """Decide, share rank 0's decision, export the pruned copy as an artifact.

        Every method takes these arguments; a model outside the zoo is pruned in place (see :meth:`export`).

        Args:
            model: the trained network.
            trainer: the Trainer (DDP: rank 0's decision is broadcast, rank 0 writes).
            path: artifact path (default ``artifact_path``).
            source: where the model came from, for provenance.
            init_state: theta_0 (of a lottery-ticket run, e.g. carried by a source artifact), written into the
                artifact when the callback keeps none of its own.
            dataloader: training images, for the methods that declare ``needs_data`` (ignored by the others).
            input_size: (C, H, W) to count FLOPs at, when the trainer has no datamodule that says it.

        Raises:
            ValueError: non-finite weights, or a network outside the zoo that no file could rebuild while an
                artifact is to be written (checked before anything is pruned).
        """
        check_finite(model)
        self.input_size(trainer, model, input_size)
        if not is_zoo_model(model) and self.resolve_path(trainer, path) is not None:
            Architecture.of(model)
        self.state.record_dense(lambda: self.dense_of(model))
        decision = self.decide(model, self.context(trainer, dataloader))
        # rank 0's keeps and masks on every rank; a network the method built itself is identical on every
        # rank already (its data-driven steps were all-reduced and broadcast as it went)
        local = decision.cpu()
        shared = self.broadcast(trainer, {"keeps": local.keeps, "masks": local.masks})
        decision.keeps, decision.masks = shared["keeps"], shared["masks"]
        if decision.masks:
            self.state.set_masks(decision.masks)
        return self.export(model, decision, trainer=trainer, path=path, source=source, init_state=init_state)

    # ---- helpers for subclasses --------------------------------------------------------------------
    @staticmethod
    def broadcast(trainer: pl.Trainer | None, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity without a trainer or outside DDP)."""
        if trainer is None or trainer.world_size == 1:
            return obj
        return trainer.strategy.broadcast(obj, src=0)

    def set_masks(self, trainer: pl.Trainer | None, model: nn.Module, masks: Masks, optimizer=None) -> None:
        """Adopt rank 0's masks and apply them (weights and momentum)."""
        self.state.set_masks(self.broadcast(trainer, {k: v.cpu() for k, v in masks.items()}))
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
        decision: Decision,
        *,
        trainer: pl.Trainer | None = None,
        path: str | None = None,
        source: str | None = None,
        init_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Artifact | None:
        """Apply ``decision`` to a *copy* of ``model``, log the result, and write the artifact on rank 0.

        The copy loses the decision's ``keeps`` physically and keeps its ``masks`` (with no keeps it is the
        full-size model with its masks: unstructured and other masked methods); a decision that carries its
        own ``pruned`` network is exported as it is. The live model is left untouched, so the trainer can still
        test or checkpoint it.

        A model outside the zoo (a torchvision/timm network, a user's own) is pruned (and masked) *in place*,
        with a warning, and its artifact records its builder and the cuts (replayed when it is loaded). One
        whose builder is unknown gets no artifact when none is asked for (``artifact_path`` None).

        Returns:
            The artifact, or None for a model outside the zoo that cannot be rebuilt (with no path to write).
        """
        dense = self.state.record_dense(lambda: self.dense_of(model))  # dense: zeros of masked weights count too
        size = self.state.input_size
        zoo = is_zoo_model(model)
        target = self.resolve_path(trainer, path)
        if not zoo:
            rank_zero_warn(
                f"{type(self).__name__}: {type(model).__name__} is not a zoo model (lit_prune.models.create_model): "
                "it is pruned in place" + (f", and its artifact ({target}) records its builder and the cuts"
                                           if target is not None else "")
            )
        pruned = decision.pruned
        if pruned is None:
            pruned = copy.deepcopy(model) if zoo else model  # every rank holds the same keeps: replicas change alike
            if decision.keeps:
                prune_groups(pruned, decision.keeps)
        if decision.masks:
            apply_masks(pruned, decision.masks)
        init = self.init_state if self.init_state is not None else init_state
        try:
            art = make_artifact(pruned, method=self.method, settings=self.settings(), source=source,
                                dense=dense, masks=decision.masks, init_state=init, input_size=size)
        except ValueError as err:  # a network no file can rebuild (prune() refused it earlier if a path was set)
            if zoo or target is not None:
                raise
            log.info("no artifact: %s", err)
            self._log_export(trainer, decision, flops_summary(pruned, dense, masked=bool(decision.masks),
                                                              input_size=size))
            return None
        self._log_export(trainer, decision, art.flops)
        self.written = self.write(art, target, trainer) or self.written
        return art

    @staticmethod
    def write(art: Artifact, target: Path | None, trainer: pl.Trainer | None) -> str | None:
        """Write ``art`` at ``target`` from global rank 0 (atomically), then wait for every rank."""
        if target is None:
            return None
        if trainer is None or trainer.is_global_zero:
            save_artifact(art, target)
            rank_zero_info(f"{art.provenance.method} artifact written to {target}")
        if trainer is not None:
            trainer.strategy.barrier("lit_prune_export")
        return str(target)

    def _log_export(self, trainer: pl.Trainer | None, decision: Decision, flops: FlopsSummary) -> None:
        metrics = {
            "prune/macs_dense": flops.dense.macs, "prune/macs_pruned": flops.pruned.macs,
            "prune/params_dense": flops.dense.params, "prune/params_pruned": flops.pruned.params,
            "prune/flops_ratio": flops.ratio,
        }
        kept = sum(int(k.sum()) for k in decision.keeps.values())
        total = sum(k.numel() for k in decision.keeps.values())
        if total:
            metrics["prune/channel_sparsity"] = 1 - kept / total
            metrics.update({f"prune/kept/{name}": int(k.sum()) for name, k in decision.keeps.items()})
        metrics.update(decision.metrics)
        log_metrics(trainer, metrics)
        what = decision.summary or (f"pruned ({kept}/{total} channels kept)" if total
                                    else f"pruned ({len(decision.masks)} masked tensors)")
        rank_zero_info(
            f"{what}: {flops.pruned.macs:,} / {flops.dense.macs:,} MACs (ratio {flops.ratio:.3f}), "
            f"{flops.pruned.params:,} / {flops.dense.params:,} params"
        )


def _optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer | None:
    return trainer.optimizers[0] if trainer.optimizers else None
