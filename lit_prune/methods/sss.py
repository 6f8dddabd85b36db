"""Sparse Structure Selection (Huang & Wang, ECCV 2018), as plain PyTorch: the accelerated proximal gradient
step on the residual blocks' factors, and the removal of the blocks whose factor reached zero (the others are
folded into their branch). The Lightning callback is :class:`lit_prune.callbacks.SparseStructureSelection`."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lit_prune.core.gates import BlockGate, apg_step_, block_gates, fold_gates_
from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.base import Context, Decision, PruningMethod

_GATED_FAMILIES = "sss_resnet50, cifar_resnet*, sfp_resnet*, resnet34, resnet50, bearpaw_resnet50"


class BlockSelection(PruningMethod):
    """Sparse block factors and the removal of the zero ones (arguments: see the callback).

    Raises:
        ValueError: an argument outside its range (the message names it).
    """

    name = "sss"

    def __init__(self, gamma: float = 0.01, momentum: float = 0.9) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma (the L1 weight on the block factors) must be a finite number >= 0, got {gamma!r}; "
                             "SSS's default is 0.01")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum (the APG momentum mu) must be a number in [0, 1), got {momentum!r}; "
                             "SSS uses 0.9")
        self.gamma, self.momentum = float(gamma), float(momentum)

    @staticmethod
    def gates(model: nn.Module) -> dict[str, BlockGate]:
        """``{gate path: gate}`` of ``model``.

        Raises:
            ValueError: the model has no block factors (it was built without ``gates: true``).
        """
        gates = block_gates(model)
        if not gates and not is_zoo_model(model):
            raise ValueError(
                f"SparseStructureSelection needs residual blocks with learnable block factors, which only zoo models "
                f"built with gates: true have (families: {_GATED_FAMILIES}); {type(model).__name__} is not a zoo "
                "model. "
                "Use a filter or channel method (L1FilterPruning, NetworkSlimming, SoftFilterPruning) for it"
            )
        if not gates:
            raise ValueError(
                f"SparseStructureSelection needs a model built with block factors, but this "
                f"{type(model).__name__} has none: set model.model_kwargs: {{gates: true}} (zoo families with "
                f"gates: {_GATED_FAMILIES})"
            )
        return gates

    @torch.no_grad()
    def apg_step(self, model: nn.Module, lr: float, velocity: dict[str, torch.Tensor], loss_scale: float = 1.0) -> None:
        """One APG step on every block factor of ``model`` from its gradient, which is then cleared.

        Args:
            model: the network whose factors have gradients of the data loss.
            lr: the learning rate eta of this step.
            velocity: the APG velocity per gate path, updated in place (the caller's schedule state).
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
                v = velocity.get(path)
                if v is None or v.device != lam.device:
                    v = torch.zeros_like(lam) if v is None else v.to(lam.device)
                    velocity[path] = v
                apg_step_(lam, grads[path] / loss_scale, v, lr, self.gamma, self.momentum)
            # The main optimizer's zero_grad does not reach these parameters: clear them, or they accumulate.
            lam.grad = None

    def keeps(self, model: nn.Module) -> dict[str, torch.Tensor]:
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

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        """Remove the blocks whose factor is 0 and fold the others, on a copy of a zoo model (in place otherwise).

        The factors are identical on every rank (the same averaged gradients and steps), so every rank builds
        the same network.
        """
        gates = self.gates(model)
        keeps = self.keeps(model)
        removed = sorted({p.rpartition(".")[0] for p in gates if gates[p].value == 0.0})
        pruned = copy.deepcopy(model) if is_zoo_model(model) else model
        prune_groups(pruned, keeps)  # zero-factor blocks become their shortcut (their gate goes with them)
        fold_gates_(pruned)  # the others absorb lambda_b into their branch: the network is ungated
        which = f" ({', '.join(removed)})" if removed else ""
        return Decision(pruned=pruned, summary=f"SSS removed {len(removed)} of {len(gates)} residual blocks{which}",
                        metrics={"prune/blocks_removed": len(removed), "prune/blocks_kept": len(gates) - len(removed)})
