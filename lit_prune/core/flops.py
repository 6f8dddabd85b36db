"""The one FLOPs and parameter counter of lit-prune, with two conventions.

One traversal (a forward pass of one zero image with forward hooks, plus a torch-function mode that sees
the functional ReLUs and global pools) counts both conventions at once; ``convention`` says which one
:attr:`FlopsReport.flops` (and :func:`flops_ratio`) reports. :attr:`FlopsReport.macs` is always the
``"macs"`` count, so tables can quote it whatever convention Scratch-B used.

``"macs"`` (the default; the convention behind the paper's quoted numbers, e.g. CIFAR VGG-16 = 3.13e8,
VGG-16-A = 2.06e8, and of every table and log):

* the multiply-accumulates of every ``Conv2d`` and ``Linear`` call for **one** input image:
  ``weight.numel() * H_out * W_out`` for a conv (bias, BN, ReLU, pooling and additions are not
  counted), ``weight.numel()`` per output position for a linear layer; an ``nn.MultiheadAttention``
  counts its q/k/v and output projections per token (it uses their weights without calling a
  ``Linear``), not the attention products, as a timm block's ``qkv``/``proj`` linears are counted;
* with ``nonzero=True`` only non-zero weights count, for conv and linear layers alike (masked models:
  unstructured, SFP, lottery).

``"reference"``: what the paper's reference counters compute (``compute_flops.py`` / ``count_flops.py``
of ``Eric-mingjie/rethinking-network-pruning``, docs/paper-settings.md §1.4), the ``r`` of its Scratch-B epochs
(docs/paper-settings.md §1.3). Multiply-adds count 2, for one image, summed over leaf-module calls:

* ``Conv2d``: ``(2 k_h k_w C_in / groups + [1 if bias]) * C_out * H_out * W_out``; with ``nonzero=True``
  the sparse variant of the weight-level, SFP and ImageNet counters, ``(2 nnz(W) + [C_out if bias]) *
  H_out * W_out`` (equal to the dense formula for a dense conv);
* ``Linear``: ``rows * (2 #weights + #bias)``, always dense (the reference counts every FC weight, also
  for masked models: "BN, ReLU and FC costs stay dense");
* ``BatchNorm2d``: ``2 numel(input)`` (``BatchNorm1d`` is not counted);
* ReLU: ``numel(input)`` per call, an ``nn.ReLU`` module and ``F.relu`` / ``torch.relu`` alike (the
  reference's models reuse one ``nn.ReLU`` per block, counted per call; ours call ``F.relu`` at the same
  points);
* ``MaxPool2d`` / ``AvgPool2d`` modules: ``k_h k_w numel(output)``;
* a global average pool to 1x1 (``F.adaptive_avg_pool2d`` / ``nn.AdaptiveAvgPool2d``, not the identity):
  ``H_in W_in numel(output)``, as the reference's ``AvgPool2d(8)`` (CIFAR ResNet, PreResNet, DenseNet)
  and torchvision 0.2's ``AvgPool2d(7)`` (ImageNet ResNet) modules that it stands for;
* not counted: channel selections, additions, concatenations, padding, dropout, gates, and the pools the
  reference instantiates inside ``forward`` and ours call functionally (``F.avg_pool2d`` / ``F.max_pool2d``:
  the CIFAR VGG final 2x2 pool, DenseNet transitions, the option-A shortcut).

Behind a channel selection (slimming's PreResNet / DenseNet: ``BN -> select -> ReLU -> conv``) the BN
counts its full input width, the ReLU and the conv the selected channels, exactly as the reference's
forward does. The two conventions' ratios agree within 0.3% on the L1-norm models (same Scratch-B
epochs) but differ by 4-25 epochs on slimming and weight-level models.

Where docs/paper-settings.md §1.4 leaves our models' counterparts open (documented choices):

* the reference counts only *modules*; ours call some ops functionally. We map them as above: every
  ReLU call counts (the spec's families use ``nn.ReLU`` modules; the SFP CIFAR ResNet, whose source the
  reference repository does not ship, is counted the same way), a global ``adaptive_avg_pool2d``
  counts as the reference's global ``AvgPool2d`` module, functional ``avg_pool2d`` / ``max_pool2d`` do not.
* ``vgg16_gap``'s ``AdaptiveAvgPool2d(1)`` is counted, while the reference's ThiNet-GAP instantiates its
  ``AvgPool2d(14, 2)`` inside ``forward`` (not counted). It is 0.001% of the model's FLOPs and ThiNet-GAP's
  r >= 2 is capped on ImageNet, so its Scratch-B epochs do not change.
* SFP's ``DownsampleA`` is an ``AvgPool2d(1, 2)`` module in SFP's code (``1 * numel(output)``); ours
  subsamples by slicing and counts nothing there (two shortcuts, < 0.01% of the FLOPs).
* docs/paper-settings.md §1.3 (weight-level) takes ``r`` with non-zero conv weights *after* the mask is applied
  (the released script counts before, r = 1; docs/paper-settings.md §12.2): pass ``nonzero=True`` for a masked model.

``params`` counts every parameter (buffers such as BN running stats and channel-selection indices are
not parameters); with ``nonzero=True`` the conv and linear weights count their non-zeros only. It is
the same under both conventions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

CONVENTIONS = ("macs", "reference")
_COUNTED = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_ADAPTIVE_AVG = {F.adaptive_avg_pool2d}


@dataclass
class LayerCount:
    """One counted layer (or, for functional ops, the module that called them: ``NAME/relu``).

    ``macs`` is its ``"macs"``-convention count (0 for BN, ReLU and pools), ``flops`` its count in the
    report's convention.
    """

    name: str
    type: str
    macs: int
    params: int
    output_shape: list[int]
    flops: int = 0


@dataclass
class FlopsReport:
    """Totals and per-layer counts; ``flops`` is in ``convention``, ``macs`` always the MACs count."""

    macs: int
    params: int
    input_size: list[int]
    nonzero: bool
    layers: list[LayerCount] = field(default_factory=list)
    convention: str = "macs"
    flops: int = -1

    def __post_init__(self) -> None:
        if self.flops < 0:
            self.flops = self.macs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The weights whose products a counted module computes."""
    if isinstance(module, nn.MultiheadAttention):  # its projections' weights, used functionally
        return module.in_proj_weight, module.out_proj.weight
    return (module.weight,)


def _weight_count(module: nn.Module, nonzero: bool) -> int:
    return sum(int(torch.count_nonzero(w)) if nonzero else w.numel() for w in _weights(module))


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _reference_flops(module: nn.Module, x: torch.Tensor, out: torch.Tensor, nonzero: bool) -> int:
    """docs/paper-settings.md §1.4, for one call of a hooked leaf module."""
    if isinstance(module, nn.Conv2d):
        positions = out.numel() // out.shape[-3]  # H_out * W_out * batch
        bias = module.bias is not None
        if nonzero:  # the sparse variant: (2 nnz(W) + [C_out]) * H_out * W_out
            return (2 * int(torch.count_nonzero(module.weight)) + (module.out_channels if bias else 0)) * positions
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        return (2 * kernel + int(bias)) * module.out_channels * positions
    if isinstance(module, nn.Linear):  # dense always; rows = the batch of a 2-D input
        rows = x.numel() // module.in_features
        return rows * (2 * module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
    if isinstance(module, nn.MultiheadAttention):  # its projections, multiply-adds counted 2
        return 2 * _weight_count(module, nonzero) * (x.numel() // module.embed_dim)
    if isinstance(module, nn.BatchNorm2d):
        return 2 * x.numel()
    if isinstance(module, _POOLS):
        kh, kw = _pair(module.kernel_size)
        return kh * kw * out.numel()
    return 0


def count_flops(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    *,
    nonzero: bool = False,
    convention: str = "macs",
) -> FlopsReport:
    """Count the FLOPs (in ``convention``), MACs and parameters of ``model`` for one input of ``input_size``.

    Args:
        model: any module; its ``input_size`` attribute (C, H, W) is used when ``input_size`` is None.
        input_size: (C, H, W) of one image, without the batch dimension.
        nonzero: count only non-zero weights (for masked models): conv and linear weights under
            ``"macs"``, conv weights under ``"reference"`` (its FC stays dense).
        convention: ``"macs"`` (conv + linear multiply-accumulates) or ``"reference"`` (docs/paper-settings.md §1.4:
            the reference counters, with BN, ReLU and pooling); see the module docstring.

    Returns:
        A :class:`FlopsReport` with totals and one :class:`LayerCount` per counted layer, in call order
        (conv and linear layers only under ``"macs"``).

    Raises:
        ValueError: an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    reference = convention == "reference"
    if input_size is None:
        input_size = tuple(getattr(model, "input_size", (3, 32, 32)))
    names = {m: n for n, m in model.named_modules()}
    per_layer: dict[Any, LayerCount] = {}
    calling: list[nn.Module] = []  # the module stack, to name functional ops by their caller

    def add(key: Any, name: str, kind: str, macs: int, flops: int, output: torch.Tensor) -> None:
        entry = per_layer.get(key)
        if entry is None:
            per_layer[key] = LayerCount(name, kind, macs, 0, list(output.shape[1:]), flops)
        else:  # a module called several times is counted per call, like the reference counter
            entry.macs += macs
            entry.flops += flops

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        macs = 0
        if isinstance(module, _COUNTED):
            weights = _weight_count(module, nonzero)
            if isinstance(module, nn.Conv2d):
                macs = weights * output.shape[-1] * output.shape[-2]
            elif isinstance(module, nn.MultiheadAttention):  # its projections, once per token
                output = output[0]
                macs = weights * (output.numel() // output.shape[-1])
            else:  # Linear: one weight matrix product per output position
                macs = weights * (output.numel() // output.shape[-1])
        flops = _reference_flops(module, inputs[0], output, nonzero) if reference else macs
        add(module, names.get(module, "?"), type(module).__name__, macs, flops, output)

    class _Functional(TorchFunctionMode):
        """Sees the ReLUs and global average pools that modules and forwards call functionally."""

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return out
            kind, flops = None, 0
            if func in _RELUS:
                kind, flops = "relu", x.numel()
            elif func in _ADAPTIVE_AVG and out.shape[-2:] == (1, 1) and tuple(x.shape[-2:]) != (1, 1):
                kind, flops = "global_avg_pool", x.shape[-1] * x.shape[-2] * out.numel()
            if kind is not None:
                owner = calling[-1] if calling else model
                add((owner, kind), f"{names.get(owner, '?') or '<model>'}/{kind}", kind, 0, flops, out)
            return out

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    if reference:
        hooked = [m for m in leaves if isinstance(m, (*_COUNTED, nn.BatchNorm2d, *_POOLS))]
    else:
        hooked = [m for m in model.modules() if isinstance(m, _COUNTED)]
    handles = [m.register_forward_hook(hook) for m in hooked]
    if reference:

        def enter(module: nn.Module, _inputs: Any) -> None:
            calling.append(module)

        def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            calling.pop()

        for m in model.modules():
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=p.device if p is not None else None)
        model.eval()
        with torch.no_grad():
            if reference:
                with _Functional():
                    model(x)
            else:
                model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    counted = {id(w) for m in model.modules() if isinstance(m, _COUNTED) for w in _weights(m)}

    def size(p: torch.Tensor) -> int:
        return int(torch.count_nonzero(p)) if nonzero and id(p) in counted else p.numel()

    params = sum(size(p) for p in model.parameters())
    for key, entry in per_layer.items():
        if isinstance(key, nn.Module):  # an attention block's count includes its output projection
            entry.params = sum(size(p) for p in key.parameters(recurse=isinstance(key, nn.MultiheadAttention)))
    layers = list(per_layer.values())
    return FlopsReport(sum(e.macs for e in layers), params, list(input_size), nonzero, layers, convention,
                       sum(e.flops for e in layers))


def macs_ratio(dense_macs: int, pruned_macs: int) -> float:
    """Scratch-B's r, ``dense count / pruned count`` (a pruned model with nothing left counts as 1).

    Works for either convention's totals, as long as both are of the same one.
    """
    return dense_macs / max(pruned_macs, 1)


def flops_ratio(
    dense: nn.Module,
    pruned: nn.Module,
    input_size: tuple[int, ...] | None = None,
    *,
    nonzero: bool = True,
    convention: str = "macs",
) -> float:
    """Scratch-B's r, ``count(dense) / count(pruned)`` in ``convention``; the pruned model counts its
    non-zero weights unless ``nonzero=False`` (pass False for a physically pruned model without masks)."""
    d = count_flops(dense, input_size, convention=convention).flops
    return macs_ratio(d, count_flops(pruned, input_size, nonzero=nonzero, convention=convention).flops)
