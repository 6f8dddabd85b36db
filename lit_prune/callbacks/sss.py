"""Sparse Structure Selection (Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural Networks",
ECCV 2018, arXiv:1707.01213), the block-level variant used for ResNets (paper-spec 7.2).

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

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback, unwrap
from lit_prune.core.gates import BlockGate, apg_step_, block_gates, fold_gates_
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.params import update_outside_optimizer
from lit_prune.methods.state import Counts

_GATED_FAMILIES = "sss_resnet50, cifar_resnet*, sfp_resnet*, resnet34, resnet50, bearpaw_resnet50"


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

    method = "sss"

    def __init__(
        self,
        gamma: float = 0.01,
        momentum: float = 0.9,
        prune_at_end: bool = True,
        artifact_path: str | None = "pruned.pt",
    ) -> None:
        super().__init__(artifact_path)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma (the L1 weight on the block factors) must be a finite number >= 0, got {gamma!r}; "
                             "SSS's default is 0.01")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum (the APG momentum mu) must be a number in [0, 1), got {momentum!r}; "
                             "SSS uses 0.9")
        if not isinstance(prune_at_end, bool):
            raise ValueError(f"prune_at_end must be true or false, got {prune_at_end!r}")
        self.gamma, self.momentum, self.prune_at_end = float(gamma), float(momentum), prune_at_end
        self._removed: list[str] = []  # blocks removed by the last prune(), for its log line
        self._total = 0  # gated blocks seen by the last prune()

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
        for gate in self.gates(unwrap(pl_module)).values():
            update_outside_optimizer(gate.weight)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        ours = {id(g.weight) for g in self.gates(unwrap(pl_module)).values()}
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
        self.apg_step(unwrap(pl_module), optimizer.param_groups[0]["lr"], _loss_scale(trainer))

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

    # ---- the factors ---------------------------------------------------------------------------------
    @staticmethod
    def gates(model: nn.Module) -> dict[str, BlockGate]:
        """``{gate path: gate}`` of ``model``.

        Raises:
            ValueError: the model has no block factors (it was built without ``gates: true``).
        """
        gates = block_gates(model)
        if not gates:
            raise ValueError(
                f"SparseStructureSelection needs a model built with block factors, but this "
                f"{type(model).__name__} has none: set model.model_kwargs: {{gates: true}} (zoo families with "
                f"gates: {_GATED_FAMILIES})"
            )
        return gates

    @torch.no_grad()
    def apg_step(self, model: nn.Module, lr: float, loss_scale: float = 1.0) -> None:
        """One APG step on every block factor of ``model`` from its gradient, which is then cleared.

        Args:
            model: the network whose factors have gradients of the data loss.
            lr: the learning rate eta of this step.
            loss_scale: the factor the gradients still carry (fp16 mixed precision), divided out here.
        """
        gates = self.gates(model)
        grads = {path: g.weight.grad for path, g in gates.items()}
        if any(grad is None for grad in grads.values()):  # no backward this step (e.g. a skipped batch)
            return
        finite = bool(torch.isfinite(torch.stack(list(grads.values()))).all())  # one device sync per step
        for path, gate in gates.items():
            lam = gate.weight
            if finite:
                v = self._velocity.get(path)
                if v is None or v.device != lam.device:
                    v = torch.zeros_like(lam) if v is None else v.to(lam.device)
                    self._velocity[path] = v
                apg_step_(lam, grads[path] / loss_scale, v, lr, self.gamma, self.momentum)
            # The main optimizer's zero_grad does not reach these parameters: clear them, or they accumulate.
            lam.grad = None

    @override
    def dense_of(self, model: nn.Module) -> Counts:
        counts = Counts.of(model)  # MACs are those of the ungated net; the factors are not parameters of it
        gates = sum(g.weight.numel() for g in block_gates(model).values())
        return Counts(macs=counts.macs, params=counts.params - gates)

    # ---- pruning -------------------------------------------------------------------------------------
    @override
    def select(self, model: nn.Module, dataloader: Any = None) -> dict[str, torch.Tensor]:
        """All-False keep vectors for every channel group of a block whose factor is exactly 0.

        Removing those groups with :func:`~lit_prune.core.surgery.prune_groups` removes the blocks' residual
        branches, factors included (each family lists the gate in its groups' ``branch``).

        Raises:
            ValueError: the model has no block factors.
            TypeError: a zero factor that no channel group's branch holds (a family that breaks the contract).
        """
        zero = {path for path, g in self.gates(model).items() if g.value == 0.0}
        groups = [g for g in channel_groups(model) if zero.intersection(g.branch)]
        missing = zero.difference(p for g in groups for p in g.branch)
        if missing:
            raise TypeError(f"{type(model).__name__} declares no channel group whose branch holds the gate(s) "
                            f"{sorted(missing)}, so their blocks cannot be removed")
        return {g.name: torch.zeros(group_size(model, g), dtype=torch.bool) for g in groups}

    @override
    def prune(
        self, model: nn.Module, *, trainer: pl.Trainer | None = None, path: str | None = None,
        source: str | None = None, init_state: dict[str, torch.Tensor] | None = None, dataloader: Any = None,
    ) -> dict[str, Any] | None:
        """Remove the blocks whose factor is 0, fold the other factors, export the ungated network.

        The live ``model`` is left as it is (a copy is pruned) when it is a zoo model; see
        :meth:`PruningCallback.export` for the other case.

        Returns:
            The artifact (None for a model outside the zoo).
        """
        gates = self.gates(model)
        self.state.record_dense(model, self.dense_of(model))
        keeps = self.broadcast(trainer, self.select(model))
        self._removed = sorted({p.rpartition(".")[0] for p in gates if gates[p].value == 0.0})
        self._total = len(gates)
        if self._removed and len(self._removed) == self._total:
            rank_zero_warn(f"SSS removes every one of the {self._total} residual blocks: the exported network is "
                           "its shortcuts only. gamma (the sparsity penalty) is probably too large for this run")
        target = copy.deepcopy(model) if is_zoo_model(model) else model
        prune_groups(target, keeps)  # zero-factor blocks become their shortcut (their gate goes with them)
        fold_gates_(target)  # the others absorb lambda_b into their branch: the network is ungated
        # the surgery is done: the base class only writes the (already pruned) network
        return self.export(target, {}, trainer=trainer, path=path, source=source, init_state=init_state)

    @override
    def export_summary(self, keeps: dict[str, torch.Tensor], masked: int) -> tuple[dict[str, float], str]:
        total, removed = self._total, self._removed
        which = f" ({', '.join(removed)})" if removed else ""
        return ({"prune/blocks_removed": len(removed), "prune/blocks_kept": total - len(removed)},
                f"SSS removed {len(removed)} of {total} residual blocks{which}")


def _loss_scale(trainer: pl.Trainer | None) -> float:
    """The fp16 loss scale still on the factors' gradients (1 without a grad scaler, e.g. fp32 or bf16)."""
    scaler = trainer.scaler if trainer is not None else None
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
