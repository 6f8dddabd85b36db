"""The one FLOPs and parameter counter of lit-prune.

Convention (the one behind the paper's quoted numbers, e.g. CIFAR VGG-16 = 3.13e8, VGG-16-A = 2.06e8):

* ``macs`` are the multiply-accumulates of every ``Conv2d`` and ``Linear`` call for **one** input
  image: ``weight.numel() * H_out * W_out`` for a conv (bias, BN, ReLU, pooling and additions are not
  counted), ``weight.numel()`` per output position for a linear layer.
* with ``nonzero=True`` only non-zero weights count, for conv and linear layers alike. This is what
  masked (unstructured, SFP, lottery) models are measured with, so that Scratch-B's ratio
  ``macs(dense) / macs(pruned)`` reflects the mask.
* ``params`` counts every parameter (buffers such as BN running stats and channel-selection indices
  are not parameters); with ``nonzero=True`` the conv and linear weights count their non-zeros only.

The reference code's ``compute_flops.py`` also counts BN, ReLU and pooling, and doubles everything for
multiply-adds; its ratios differ from ours by under 0.3% on the CIFAR models and give the same
Scratch-B epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

_COUNTED = (nn.Conv2d, nn.Linear)


@dataclass
class LayerCount:
    name: str
    type: str
    macs: int
    params: int
    output_shape: list[int]


@dataclass
class FlopsReport:
    macs: int
    params: int
    input_size: list[int]
    nonzero: bool
    layers: list[LayerCount] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight_count(module: nn.Module, nonzero: bool) -> int:
    w = module.weight
    return int(torch.count_nonzero(w)) if nonzero else w.numel()


def count_flops(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    *,
    nonzero: bool = False,
) -> FlopsReport:
    """Count multiply-accumulates and parameters of ``model`` for one input of ``input_size``.

    Args:
        model: any module; its ``input_size`` attribute (C, H, W) is used when ``input_size`` is None.
        input_size: (C, H, W) of one image, without the batch dimension.
        nonzero: count only non-zero conv/linear weights (for masked models).

    Returns:
        A :class:`FlopsReport` with totals and one :class:`LayerCount` per counted layer, in call order.
    """
    if input_size is None:
        input_size = tuple(getattr(model, "input_size", (3, 32, 32)))
    names = {m: n for n, m in model.named_modules()}
    per_layer: dict[nn.Module, LayerCount] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        weights = _weight_count(module, nonzero)
        if isinstance(module, nn.Conv2d):
            macs = weights * output.shape[-1] * output.shape[-2]
        else:  # Linear: one weight matrix product per output position
            macs = weights * (output.numel() // output.shape[-1])
        entry = per_layer.get(module)
        if entry is None:
            per_layer[module] = LayerCount(
                names.get(module, "?"), type(module).__name__, macs, 0, list(output.shape[1:])
            )
        else:  # a module called several times is counted per call, like the reference counter
            entry.macs += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=p.device if p is not None else None)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    counted_weights = {id(m.weight): m for m in model.modules() if isinstance(m, _COUNTED)}
    params = 0
    for p in model.parameters():
        if nonzero and id(p) in counted_weights:
            params += int(torch.count_nonzero(p))
        else:
            params += p.numel()
    for module, entry in per_layer.items():
        entry.params = sum(
            _weight_count(module, nonzero) if name == "weight" else p.numel()
            for name, p in module.named_parameters(recurse=False)
        )
    layers = list(per_layer.values())
    return FlopsReport(sum(e.macs for e in layers), params, list(input_size), nonzero, layers)


def macs_ratio(dense_macs: int, pruned_macs: int) -> float:
    """Scratch-B's r, ``dense MACs / pruned MACs`` (a pruned model with no MACs left counts as 1)."""
    return dense_macs / max(pruned_macs, 1)


def flops_ratio(dense: nn.Module, pruned: nn.Module, input_size: tuple[int, ...] | None = None) -> float:
    """``macs(dense) / macs(pruned)``, counting non-zero weights of the pruned model (Scratch-B's r)."""
    return macs_ratio(count_flops(dense, input_size).macs, count_flops(pruned, input_size, nonzero=True).macs)
