"""Block scaling factors of Sparse Structure Selection (Huang & Wang, ECCV 2018; docs/paper-settings.md §7.2).

A gated residual block computes ``out = shortcut + lambda_b * F(x)`` with one learnable scalar ``lambda_b``
per block (a :class:`BlockGate`, initialised to 1). Training pushes the factors to exactly zero with a
proximal step (:func:`apg_step_`); a block whose factor is zero is then removed, the others are folded into
the branch's last linear layer (:func:`fold_gates_`), so the exported network has no gates and computes the
same function.

How a model family takes part (CIFAR ResNets, ImageNet / bearpaw ResNets, SSS's pre-activation ResNet-50,
each with a ``gates: bool = False`` constructor argument):

* a gated block holds its factor as a :class:`BlockGate` submodule named ``gate`` (absent when the model is
  built without gates, so that state dicts stay those of the ungated model, torchvision's included);
* the block implements :class:`lit_prune.core.protocols.GatedBlock`: its class attribute ``gate_folds_into``
  names the submodule whose output the gate scales (the branch's last BN, or its last conv when no BN
  follows it);
* the gate's path is part of the ``branch`` of the block's channel groups, so removing the branch (surgery
  with an all-False keep) removes the gate with it, and a mask simulation of the removal zeroes it too.

No Lightning here: the callback ``callbacks.SparseStructureSelection`` drives these functions.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_prune.core.protocols import GatedBlock, is_zoo_model


class BlockGate(nn.Module):
    """SSS's per-block factor lambda_b: multiplies a residual branch's output, initialised to 1.

    ``weight`` is a 0-dim parameter, so that the factor broadcasts over (N, C, H, W) and keeps the dtype of
    the activation under autocast.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    @property
    def value(self) -> float:
        """lambda_b as a Python float."""
        return float(self.weight.detach())

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight  # (N, C, H, W) * () -> (N, C, H, W)

    def extra_repr(self) -> str:
        return f"lambda={self.value:.4g}"


def block_gates(model: nn.Module) -> dict[str, BlockGate]:
    """``{gate module path: gate}`` of every gated block, in forward order (empty for an ungated model)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, BlockGate)}


def soft_threshold(z: torch.Tensor, t: float) -> torch.Tensor:
    """``sign(z) * max(|z| - t, 0)``: the proximal operator of ``t * |z|``."""
    return torch.sign(z) * torch.clamp(z.abs() - t, min=0)


@torch.no_grad()
def apg_step_(
    lam: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, lr: float, gamma: float, momentum: float
) -> None:
    """One step of SSS's accelerated proximal gradient in NAG form, in place on ``lam`` and ``velocity``.

    With learning rate eta, penalty gamma and momentum mu (``SSS:core/optimizer.py``, docs/paper-settings.md §7.2)::

        v <- mu v;  z <- lam - eta grad;  z <- soft_threshold(z, eta gamma);  v <- z - lam + v;
        lam <- z + mu v;  lam <- max(lam, 0)

    ``grad`` is the gradient of the data loss only: the penalty ``gamma * |lam|`` enters through the
    threshold, and the factors have no weight decay.
    """
    velocity.mul_(momentum)
    z = soft_threshold(lam - lr * grad, lr * gamma)
    velocity.add_(z - lam)
    lam.copy_(z + momentum * velocity).clamp_(min=0)


@torch.no_grad()
def scale_outputs_(module: nn.Module, factor: torch.Tensor | float) -> None:
    """Multiply every output of ``module`` by ``factor``: BN gamma and beta, or a conv's / linear's weight and bias.

    Raises:
        TypeError: a module whose output is not linear in its parameters (e.g. a BN without affine).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
        raise TypeError("a BatchNorm without affine parameters cannot absorb a block factor")
    if not isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Conv2d, nn.Linear)):
        raise TypeError(f"cannot fold a block factor into a {type(module).__name__}")
    for p in (module.weight, module.bias):
        if p is not None:
            p.mul_(factor)


@torch.no_grad()
def fold_gates_(model: nn.Module) -> None:
    """Fold every block factor into its branch and remove the gates: the model then has ``gates: false``.

    For each gated block, the module named by its ``gate_folds_into`` absorbs lambda_b (BN gamma and beta, or
    a conv's weight, times lambda_b), so ``shortcut + lambda_b * F(x)`` becomes ``shortcut + F'(x)`` exactly
    (up to float rounding). A zero factor leaves a branch of zeros: remove it with surgery to save its
    compute (the SSS callback does both). The zoo description (``model.zoo_kwargs``) drops ``gates`` so that
    :func:`lit_prune.models.architecture` rebuilds the ungated network.

    Raises:
        TypeError: a gate sits in a module that is not a :class:`~lit_prune.core.protocols.GatedBlock`.
    """
    for path in block_gates(model):
        parent, _, name = path.rpartition(".")
        block = model.get_submodule(parent) if parent else model
        if not isinstance(block, GatedBlock):
            raise TypeError(f"{path}: {type(block).__name__} holds a block factor but does not say where it folds "
                            "(gate_folds_into, see lit_prune.core.protocols.GatedBlock)")
        target = getattr(block, block.gate_folds_into, None)
        if target is not None:
            scale_outputs_(target, getattr(block, name).weight.detach())
        setattr(block, name, None)
    if is_zoo_model(model):
        model.zoo_kwargs.pop("gates", None)
