"""The LightningModule for image classification that every stage of the protocol trains."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lit_prune.artifact import build_model, load_artifact
from lit_prune.core.flops import count_flops
from lit_prune.core.init import reinit_masked_
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.schedule import PiecewiseConstant, milestones_for
from lit_prune.methods.params import optimizer_parameters
from lit_prune.methods.state import CHECKPOINT_KEY, PruneState
from lit_prune.models import architecture, create_model

log = logging.getLogger(__name__)

REGIMES = ("finetune", "scratch", "rewind")


class ImageClassifier(pl.LightningModule):
    """Any zoo model (or your own ``nn.Module``) trained with the paper's SGD recipes.

    Args:
        arch: registry name of a zoo model (``python -m lit_prune.flops --list``).
        cfg: its width config, or the name of a registered one (``"A"``); None for the unpruned model.
        num_classes: classifier outputs; LightningCLI links it to the datamodule's.
        model_kwargs: further constructor arguments of the zoo model (e.g. ``select``).
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: applied to every parameter the optimizer updates (BN included), as the reference code
            does; parameters a pruning method updates itself (SSS's block factors) get none.
        nesterov: Nesterov momentum (the SFP scripts use it; the others do not).
        schedule: ``"multistep"``, ``"step"`` or ``"constant"``.
        milestones: epochs of the LR changes for ``"multistep"``; default 50% and 75% of
            ``trainer.max_epochs``.
        gamma: LR factor per milestone; a list gives one factor per milestone (SFP: 10, 0.2, 0.2, 0.2).
        step_size: epochs between LR changes for ``"step"``; default a third of ``max_epochs``.
        artifact: path of a pruned artifact to start from instead of ``arch``/``cfg``.
        regime: how a run starts from ``artifact``: ``"finetune"`` inherits the pruned weights,
            ``"scratch"`` builds the pruned architecture (widths, channel selections, masks) with a
            fresh initialisation (Scratch-E; Scratch-B is the same with more epochs; masked convs get
            the density-corrected He init), ``"rewind"`` restarts from the artifact's saved
            initialisation theta_0 times the mask (a lottery-ticket "winning ticket"). Masks of masked
            artifacts stay enforced in every regime (weights, gradients and momentum).
        builder: the function or class that builds the network of an artifact recorded as ``user:...``
            (``rebuildable``); lit-prune never imports it from the file. From the CLI an import path,
            ``--model.builder mypkg.nets.MyNet``. Not saved in hparams.
        init: ``init(network)`` initialises the network of a ``scratch`` regime instead of its own init (a
            zoo family's scheme, or every layer's ``reset_parameters()``); an import path from the CLI. Not
            saved in hparams.
        model: an ``nn.Module`` to train instead of a zoo model (Python use; not saved in hparams).
        channels_last: keep the network's conv weights and every batch in the channels_last memory format
            (NHWC: faster convolutions on GPUs, above all under bf16). Outputs equal the default layout's
            within float tolerance.
        compile: run the network's forward through ``torch.compile``: ``true``, or a mapping of
            ``torch.compile``'s keyword arguments (``mode: max-autotune``, ``backend: aot_eager``, ...).
            ``dynamic`` defaults to False here: the last, smaller batch of an epoch gets a graph of its own
            instead of turning every graph into a dynamic-shape one. Only the forward call is compiled:
            :attr:`model` stays the eager module, so masks, hooks, surgery, checkpoints and artifacts act on
            its parameters (no ``_orig_mod.`` keys), and a surgery that changes its parameters during a fit
            is noticed at the next forward, which recompiles. bf16 is Lightning's ``trainer.precision``
            (``bf16-mixed``).

    YAML::

        model:
          arch: cifar_resnet56
          cfg: B
          lr: 0.1
          weight_decay: 1.0e-4
          channels_last: true        # the fast path (README "Fast path"), with trainer.precision: bf16-mixed
          compile: {mode: max-autotune-no-cudagraphs}
    """

    def __init__(
        self,
        arch: str | None = None,
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
        artifact: str | None = None,
        regime: str = "finetune",
        builder: Callable[..., nn.Module] | None = None,
        init: Callable[[nn.Module], None] | None = None,
        model: nn.Module | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,  # noqa: A002 (the YAML key; the builtin is not used here)
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        milestones_for(schedule, 1, milestones, step_size)  # validates the schedule name early
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
        self._compile_options = _compile_options(compile)
        self._channels_last = bool(channels_last)
        # (the eager network's structure, the callable that runs it): rebuilt when surgery changes the network
        self._fast: tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] | None = None
        if init is not None and (regime != "scratch" or artifact is None):
            raise ValueError("init initialises the network of a scratch run from an artifact; give "
                             "artifact and regime: scratch, or drop init")
        self.save_hyperparameters(ignore=["model", "builder", "init"])  # code, not data (a checkpoint holds data)
        # masks and theta_0 of a masked artifact (kept enforced in every regime, saved in checkpoints)
        self.prune_state = PruneState()
        #: the method that pruned the artifact this run started from (None without an artifact)
        self.source_method: str | None = None
        if model is None and artifact is not None:
            model = self._from_artifact(artifact, regime, arch, num_classes, builder, init)
        elif model is None:
            if arch is None:
                raise ValueError("give arch (a zoo model name, see `python -m lit_prune.flops --list`), "
                                 "artifact (a pruned artifact path) or model (an nn.Module)")
            model = create_model(arch, cfg=cfg, num_classes=num_classes, **(model_kwargs or {}))
        self.model = model
        if self._channels_last:  # before any optimizer or DDP wrapper sees the parameters
            model.to(memory_format=torch.channels_last)
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

    def _from_artifact(self, path: str, regime: str, arch: str | None, num_classes: int,
                       builder: Callable[..., nn.Module] | None, init: Callable[[nn.Module], None] | None
                       ) -> nn.Module:
        art = load_artifact(path)
        name, kwargs = art.architecture.name, art.architecture.kwargs
        if arch is not None and arch != name:
            raise ValueError(f"arch is {arch!r} but the artifact {path} holds a {name!r}; drop arch or give "
                             "the artifact pruned from that model")
        self.source_method = art.provenance.method
        if regime == "finetune" and art.provenance.method == "predefined":
            raise ValueError(f"{path} is an architecture-only artifact (a predefined width config, no trained "
                             "weights): train it with regime scratch; there is nothing to fine-tune")
        model = build_model(art, weights=regime == "finetune", builder=builder, init=init)
        # An artifact of a model built without num_classes has the builder's default, not the data's count.
        classes = kwargs.get("num_classes", _classifier_width(model))
        if classes is not None and classes != num_classes:
            raise ValueError(f"the artifact {path} was pruned for {classes} classes but the data "
                             f"has {num_classes}; use an artifact pruned on this dataset")
        state = self.prune_state
        state.set_masks(art.masks)
        state.init_state = art.init_state  # theta_0 travels on, for the next lottery round
        if regime == "scratch" and state.masks:
            reinit_masked_(model, state.masks)
        elif regime == "rewind":
            if state.init_state is None:
                raise ValueError(f"the artifact {path} holds no initialisation theta_0 to rewind to; prune with "
                                 "keep_init: true (and a masked method) for lottery tickets")
            try:
                model.load_state_dict(state.init_state)
            except RuntimeError:
                raise ValueError(f"theta_0 in {path} does not fit its pruned architecture; rewinding needs a "
                                 "masked artifact (e.g. L1FilterPruning mode: mask)") from None
            state.after_optimizer_step(model)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._network()(x)

    def _network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What runs :attr:`model`'s forward: the module itself, or its compiled form (channels_last re-applied
        and recompiled after a surgery replaced parameters; the eager module's parameters are the compiled
        one's)."""
        if not self._channels_last and self._compile_options is None:
            return self.model
        key = (id(self.model), *map(id, self.model.parameters()))  # surgery makes new Parameters
        if self._fast is None or self._fast[0] != key:
            if self._fast is not None:
                log.info("the network changed since the last forward (surgery): %s",
                         "recompiling" if self._compile_options is not None else "back to channels_last")
            if self._channels_last:  # surgery writes contiguous tensors; .to keeps the Parameter objects
                self.model.to(memory_format=torch.channels_last)
            run = self.model if self._compile_options is None else torch.compile(self.model, **self._compile_options)
            # a tuple, not an attribute holding the OptimizedModule: that would be registered as a submodule and
            # its parameters saved a second time under _orig_mod.
            self._fast = (key, run)
        return self._fast[1]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fast"] = None  # a compiled callable does not pickle; the next forward rebuilds it
        return state

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks of the artifact this run started from (empty otherwise)."""
        return self.prune_state.masks

    @property
    def init_state(self) -> dict[str, torch.Tensor] | None:
        """theta_0 carried by the artifact (lottery tickets), or None."""
        return self.prune_state.init_state

    # Masks of masked artifacts stay enforced: gradients before the step, weights and momentum after.
    def on_before_optimizer_step(self, optimizer) -> None:
        self.prune_state.before_optimizer_step(self.model)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.prune_state.after_optimizer_step(self.model, self.trainer.optimizers[0])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restored = PruneState.from_module_checkpoint(checkpoint)
        if restored is not None:
            if restored.init_state is None:  # an older checkpoint without theta_0 keeps the artifact's
                restored.init_state = self.prune_state.init_state
            self.prune_state = restored

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if stage == "train" and not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {float(loss)} at step {self.global_step} (epoch {self.current_epoch}): the run "
                "has diverged or started from non-finite weights; lower the learning rate, or resume from a "
                "checkpoint taken before the divergence"
            )
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
        # A pruning method that updates some parameters itself (SSS's block factors: a proximal step, no weight
        # decay) marks them (lit_prune.methods.params): SGD leaves them alone.
        params = optimizer_parameters(self)
        optimizer = torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps = milestones_for(hp.schedule, max_epochs, hp.milestones, hp.step_size)
        gammas = list(hp.gamma) if isinstance(hp.gamma, Sequence) else [hp.gamma] * len(steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PiecewiseConstant(steps, gammas))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self) -> None:
        self._log_model_size()

    def on_fit_end(self) -> None:
        acc = self.trainer.callback_metrics.get("val/acc1")
        ckpt = self.trainer.checkpoint_callback
        where = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        rank_zero_info(
            (f"final val/acc1: {100 * float(acc):.2f}%" if acc is not None else "fit finished")
            + (f" | checkpoint: {where}" if where else "")
            + (f" | TensorBoard: tensorboard --logdir {self.trainer.log_dir}" if self.logger is not None else "")
        )

    @rank_zero_only
    def _log_model_size(self) -> None:
        report = count_flops(self.model, nonzero=bool(self.masks))  # non-zeros only where masks say weights are gone
        log.info("model: %s MACs, %s parameters", f"{report.macs:,}", f"{report.params:,}")
        if self.logger is not None:
            self.logger.log_metrics({"model/macs": report.macs, "model/params": report.params}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Surgery may have changed the widths since __init__: keep the hyper-parameters describing the
        # weights, so that load_from_checkpoint rebuilds the pruned model without the artifact.
        if is_zoo_model(self.model):
            kwargs = dict(architecture(self.model)["kwargs"])
            hp = checkpoint.setdefault("hyper_parameters", {})
            hp["cfg"] = kwargs.pop("cfg", None)
            kwargs.pop("num_classes", None)
            hp["model_kwargs"] = kwargs
            hp["arch"] = self.model.zoo_name
            if hp.get("artifact"):  # the checkpoint now describes the model itself
                hp["source_artifact"], hp["artifact"] = hp["artifact"], None
        if self.masks or self.init_state is not None:  # theta_0 of a lottery ticket travels with its retrained model
            checkpoint[CHECKPOINT_KEY] = self.prune_state.state_dict()


def _compile_options(compile: bool | dict[str, Any] | None) -> dict[str, Any] | None:  # noqa: A002
    """``torch.compile`` keyword arguments of the ``compile`` option (None: not compiled)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        compile = {}
    if not isinstance(compile, dict):
        raise ValueError(f"compile must be true, false or a mapping of torch.compile arguments, got {compile!r}")
    known = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(set(compile) - set(known))
    if unknown:
        raise ValueError(f"compile: unknown torch.compile argument(s) {unknown}; known: {', '.join(known)}")
    return {"dynamic": False, **compile}


def _classifier_width(model: nn.Module) -> int | None:
    """Output width of the last ``nn.Linear`` (the classifier of every zoo model), None without one."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
