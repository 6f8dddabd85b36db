"""Initialisation schemes of the paper's model families (docs/paper-settings.md §1.5)."""

from __future__ import annotations

import math

import torch
from torch import nn


def he_fan_out_(conv: nn.Conv2d) -> None:
    """N(0, sqrt(2 / (k_h * k_w * C_out))): the reference code's CIFAR and ImageNet conv init."""
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / n))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def he_fan_in_(conv: nn.Conv2d) -> None:
    """N(0, sqrt(2 / (k_h * k_w * C_in))): bearpaw's CIFAR VGG (weight-level pruning)."""
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / n))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def bn_(bn: nn.Module, gamma: float = 1.0) -> None:
    """BatchNorm: weight = gamma (0.5 in the slimming models), bias = 0."""
    nn.init.constant_(bn.weight, gamma)
    nn.init.zeros_(bn.bias)


def linear_normal_(linear: nn.Linear, std: float = 0.01) -> None:
    """N(0, std) weight and zero bias: the VGG classifiers."""
    nn.init.normal_(linear.weight, 0.0, std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def he_bn_init_(model: nn.Module, bn_gamma: float = 1.0) -> None:
    """The ResNet/PreResNet/DenseNet scheme: He fan-out convs, BatchNorm gamma ``bn_gamma`` (0.5 in the slimming
    models) with fresh running statistics, SSS block gates at 1. Linear layers are left to the caller."""
    from lit_prune.core.gates import BlockGate

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            he_fan_out_(m)
        elif isinstance(m, nn.BatchNorm2d):
            bn_(m, bn_gamma)
            m.reset_running_stats()
        elif isinstance(m, BlockGate):
            m.reset_parameters()


def density_corrected_he_(conv: nn.Conv2d, mask: torch.Tensor) -> None:
    """Re-draw a masked conv with N(0, sqrt(2/n)), n = nnz(mask) / C_in, then apply the mask.

    The weight-level and SFP scratch runs use this density-corrected fan-out (docs/paper-settings.md §1.5).
    """
    n = max(int(mask.sum()) / conv.in_channels, 1.0)
    with torch.no_grad():
        conv.weight.normal_(0.0, math.sqrt(2.0 / n)).mul_(mask.to(conv.weight.dtype))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def reinit_masked_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Fresh weights for a masked model: density-corrected He init for masked convs, then every mask.

    The rest of the model keeps the initialisation its constructor just gave it.
    """
    for name, module in model.named_modules():
        mask = masks.get(f"{name}.weight")
        if isinstance(module, nn.Conv2d) and mask is not None:
            density_corrected_he_(module, mask.expand_as(module.weight))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, mask in masks.items():
            params[pname].mul_(mask.to(params[pname].device))
