"""Sparse Structure Selection (Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural Networks",
ECCV 2018, arXiv:1707.01213), the block-level variant used for ResNets (docs/paper-settings.md §7.2).

1. **Block factors.** Every residual block computes ``out = shortcut + lambda_b * F(x)`` with one scalar
   ``lambda_b`` per block, initialised to 1. The factors belong to the model (build it with
   ``model_kwargs: {gates: true}``), so checkpoints, DDP's gradient all-reduce and artifacts carry them; they
   exist before the optimizer and the DDP wrapper are built. The callback marks them in ``setup`` so that
   :class:`~lit_prune.module.ImageClassifier`'s SGD leaves them out: they get **no weight decay** and no SGD.
2. **Objective** ``CE + wd * ||W||^2 + gamma * sum_b |lambda_b|``, optimised for the factors by the
   accelerated proximal gradient of ``SSS:core/optimizer.py`` in NAG form
   (:func:`lit_prune.core.gates.apg_step_`): with the main optimizer's *current* learning rate eta (its LR
   schedule applies), momentum mu and a velocity v per factor::

       v <- mu v;  z <- lambda - eta dCE/dlambda;  z <- soft_threshold(z, eta gamma);
       v <- z - lambda + v;  lambda <- z + mu v;  lambda <- max(lambda, 0)

   The soft threshold sets factors to *exactly* zero. The step runs in ``on_before_optimizer_step``, once
   per optimizer step: after gradient accumulation, after DDP has averaged the gradients (every rank takes
   the same step) and, under fp16 mixed precision, with the loss scale divided out (Lightning's scaler
   unscales only the optimizer's own parameters). A step whose factor gradients are not finite (an fp16
   overflow, which the scaler also skips) is skipped. The velocities are checkpoint state: a resumed run
   continues exactly.
3. **Pruning** at the end of training (or ``python -m lit_prune.prune`` on a checkpoint): every block whose
   factor is 0 is removed (it becomes its shortcut; a stage's first block keeps its projection or
   parameter-free shortcut), every other factor is folded into its branch's last BN (gamma and beta times
   lambda_b; the last conv in SSS's pre-activation ResNet-50). The artifact is the ungated network
   (``gates: false``) and computes the same function as the trained, gated one.

Different gammas give different depths; the paper's ResNet-41/32/26 came out of SSS's runs (its default
gamma is 0.01) and are registered as width configs of ``sss_resnet50`` for Scratch-E/B.

YAML (SSS on the pre-activation ResNet-50, ``configs/methods/sss_resnet50.yaml``)::

    model:
      model_kwargs: {gates: true}
    trainer:
      callbacks:
        - class_path: callbacks.SparseStructureSelection
          init_args: {gamma: 0.01, momentum: 0.9}

TensorBoard: every epoch ``sss/lambda/<block>`` (each factor), ``sss/zero_blocks`` and ``sss/lambda_l1``; at
the end the export metrics (``prune/flops_ratio``, ``prune/blocks_removed``, ...).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, unwrap
from lit_prune.core.gates import block_gates
from lit_prune.methods.base import Context, Decision
from lit_prune.methods.params import update_outside_optimizer
from lit_prune.methods.sss import BlockSelection
from lit_prune.methods.state import Counts


class SparseStructureSelection(PruningCallback):
    """Learn which residual blocks to keep with sparse block factors, then remove the blocks whose factor is 0.

    Args:
        gamma: weight of the L1 penalty ``gamma * sum |lambda_b|`` (SSS's default 0.01); larger values remove
            more blocks. 0 trains the factors without sparsity.
        momentum: the APG momentum mu, in [0, 1) (SSS: 0.9, the main optimizer's).
        prune_at_end: remove the zero blocks and write the artifact when training ends; False only trains
            (prune later with ``python -m lit_prune.prune``).
        artifact_path: where the artifact is written (relative to the trainer's log directory); None
            writes none.

    Raises:
        ValueError: an argument outside its range (the message names it).
    """


    def __init__(
        self,
        gamma: float = 0.01,
        momentum: float = 0.9,
        prune_at_end: bool = True,
        artifact_path: str | None = "pruned.pt",
    ) -> None:
        super().__init__(artifact_path)
        if not isinstance(prune_at_end, bool):
            raise ValueError(f"prune_at_end must be true or false, got {prune_at_end!r}")
        self.pruner = BlockSelection(gamma, momentum)
        self.prune_at_end = prune_at_end

    # ---- state: the APG velocities live in the pruning state, saved in checkpoints --------------------
    @property
    def _velocity(self) -> dict[str, torch.Tensor]:
        """The APG velocity per gate path (e.g. ``"layer1.0.gate"``)."""
        return self.state.schedule.setdefault("velocity", {})

    # ---- hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Runs before configure_optimizers and the DDP wrapper: the factors must already be in the model.
        for gate in self.pruner.gates(unwrap(pl_module)).values():
            update_outside_optimizer(gate.weight)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        ours = {id(g.weight) for g in self.pruner.gates(unwrap(pl_module)).values()}
        for opt in trainer.optimizers:
            if any(id(p) in ours for group in opt.param_groups for p in group["params"]):
                raise ValueError(
                    f"the optimizer of {type(pl_module).__name__} also updates the SSS block factors, which "
                    "SparseStructureSelection updates itself (APG, no weight decay): build the optimizer over "
                    "lit_prune.methods.params.optimizer_parameters(module) in configure_optimizers, as "
                    "ImageClassifier does"
                )

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.pruner.apg_step(unwrap(pl_module), optimizer.param_groups[0]["lr"], self._velocity, _loss_scale(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lams = {path: g.value for path, g in block_gates(unwrap(pl_module)).items()}
        if not lams:
            return
        metrics = {f"sss/lambda/{path.removesuffix('.gate')}": v for path, v in lams.items()}
        metrics["sss/zero_blocks"] = float(sum(v == 0 for v in lams.values()))
        metrics["sss/lambda_l1"] = sum(abs(v) for v in lams.values())
        # identical on every rank (same averaged gradients, same steps); sync_dist only silences the DDP warning
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prune_at_end:
            self.prune(unwrap(pl_module), trainer=trainer)

    @override
    def dense_of(self, model: nn.Module) -> Counts:
        # MACs are those of the ungated net; the factors are not parameters of it
        counts = Counts.of(model, input_size=self.state.input_size)
        gates = sum(g.weight.numel() for g in block_gates(model).values())
        return Counts(macs=counts.macs, params=counts.params - gates)

    @override
    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        decision = super().decide(model, ctx)
        if decision.metrics["prune/blocks_kept"] == 0:
            rank_zero_warn(f"SSS removes every one of the {decision.metrics['prune/blocks_removed']} residual blocks: "
                           "the exported network is its shortcuts only. gamma (the sparsity penalty) is probably too "
                           "large for this run")
        return decision


def _loss_scale(trainer: pl.Trainer | None) -> float:
    """The fp16 loss scale still on the factors' gradients (1 without a grad scaler, e.g. fp32 or bf16)."""
    scaler = trainer.scaler if trainer is not None else None
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
