"""Prunable channel groups of an arbitrary model, found by tracing its forward pass with ``torch.fx``.

Zoo models declare their groups; a user's own network (a torchvision ResNet or VGG attached to their own
Trainer) gets them from :func:`trace_channel_groups`, which :func:`lit_prune.core.groups.channel_groups`
falls back to for a model without a ``channel_groups()`` method.

The rule is deliberately narrow, so that a traced group is always safe to cut. A ``Conv2d`` (``groups=1``)
is prunable when every path from its output ends in the *input* of a ``Conv2d`` (``groups=1``) or a
``Linear``, and passes only through ops that treat channels independently and keep them on dim 1:

* ``BatchNorm2d`` or ``SyncBatchNorm`` (affine): it becomes a producer of the group (sliced with the conv,
  zeroed by a mask), and the first one met is the group's ``bn``;
* element-wise activations (ReLU, ReLU6, LeakyReLU, SiLU, GELU, ELU, Mish, Tanh, Hardswish, Sigmoid,
  Hardsigmoid), ``Dropout``/``Dropout2d``, ``Identity``, ``contiguous()``, as modules, functions or methods;
* 2-d max/average pools (fixed or adaptive), and a mean over the two spatial dims;
* a flatten to ``(N, C * R)`` (``torch.flatten(x, 1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``,
  checked on the traced shapes), after which only a ``Linear`` may read it: each channel then owns ``R``
  consecutive columns (``R = 7 * 7`` in torchvision's VGG), which surgery infers from ``in_features // C``;
  a ``BatchNorm1d`` is accepted after a flatten only when ``R == 1`` (it then becomes a producer).

Anything else on a path makes the conv *not* prunable, and it is skipped: a residual addition, a
concatenation, a multiplication, indexing, the model output, a grouped or depthwise consumer, an unknown
module, a parameter read directly (``get_attr``, tied weights), or a conv/BN/consumer module called more
than once. Hence in a ResNet only the inner convs of each block are found, never the convs whose outputs
meet a residual addition (a block's last conv, the downsample convs, the stem where an identity shortcut
reads it; ResNet-50's stem is found: layer1.0's conv1 and downsample conv are its only readers), and in a
DenseNet only the bottleneck convs. Custom modules that own buffers are opaque (unknown ops), because fx
would inline their forward with its Python conditions frozen: a ``ChannelSelection`` that keeps every
channel would vanish from the graph, although it indexes the channels once pruned.

Two more conditions keep a masked model equal to the physically pruned one (the design's invariant): a
channel removed by a mask must reach every consumer as exact zeros, so a path through an activation
with ``f(0) != 0`` (Sigmoid, Hardsigmoid) needs a BatchNorm after it, and a BatchNorm must be affine.

``Linear -> [BatchNorm1d] -> activation/dropout -> Linear`` chains become groups too when they contain a
``BatchNorm1d`` (which Network Slimming scores); plain FC chains have nothing a criterion scores and are
left out, as in the zoo. Traced groups never have a ``branch``: a traced chain may not be pruned to zero
channels (surgery refuses), and no block is removed.

Why not Torch-Pruning's ``DependencyGraph`` (design.md's suggestion): it would be a dependency for one job
that we want done narrowly and conservatively. It follows the autograd graph of a real forward and maps
autograd nodes it has no rule for to generic element-wise nodes, so an op it does not know passes the
dependency on, where we skip the conv; it couples channels across residual additions and concatenations
(whole residual streams become one group), which the paper's methods never prune and our criteria do not
score; our ``ChannelSelection`` (an ``index_select`` on a buffer) and the option-A zero-padded shortcut
would need custom rules; and it prunes with its own functions, where we need
:class:`~lit_prune.core.groups.ChannelGroup` records (stable names, one scored conv, its BN) for the one
surgery and mask path every method shares, so its groups would have to be translated and filtered back
to what this module finds directly. ``torch.fx`` ships with torch, and every op this rule accepts is
listed above.

Cost: the forward is traced symbolically, then run on fake tensors (shapes only, no arithmetic, through
torch's ``FakeTensorMode``), so tracing a ResNet-50 at 224x224 takes about half a second on a CPU and
allocates no activations; only where an op cannot run on fake tensors is the model run once for real.

What the tracer cannot handle: models whose forward does not trace symbolically (data-dependent control
flow, such as ``if x.sum() > 0``; several or non-tensor inputs), where it raises ``TypeError`` (such a model
can declare ``channel_groups()`` itself); the residual stream, channel selections and concatenated inputs,
which only a zoo model's declared groups can prune; grouped/depthwise convs (MobileNet's expansion convs),
``ConvTranspose``, ``Conv1d``/``Conv3d``, LayerNorm/GroupNorm and attention, which are unknown ops (skipped,
never cut). A forward that branches in Python on a layer's *width* (``if self.conv.out_channels == 64``) is
traced for the current widths only; nothing can detect that, so such a model should declare its groups.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lit_prune.core.groups import ChannelGroup

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (3, 32, 32)
IMAGENET_INPUT_SIZE = (3, 224, 224)
_SHAPE = "lit_prune_shape"  # node.meta key of a tensor result's shape

# Element-wise ops with f(0) == 0: a masked (zero) channel stays zero through them.
_ZERO_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Mish, nn.Tanh, nn.Hardswish,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_ZERO_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.elu, F.mish, F.tanh, torch.tanh, F.hardswish,
    F.dropout, F.dropout2d,
}  # fmt: skip
_ZERO_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous"}
# Element-wise ops with f(0) != 0: a masked channel becomes a constant, which only a later BN cancels.
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_NONZERO_METHODS = {"sigmoid", "sigmoid_"}
# 2-d pools: per channel, (N, C, H, W) -> (N, C, H', W'); an all-zero channel pools to zeros.
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# Reshapes accepted only when the traced shapes show a per-sample flatten (N, C, H, W) -> (N, C*H*W).
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEAN_FUNCTIONS = {torch.mean}
# Queries that read a tensor's shape, not its values: harmless users of a channel tensor.
_SHAPE_METHODS = {"size", "dim"}


@dataclass
class _Walk:
    """What one producer's channels reach: the group under construction, or why there is none."""

    producers: list[str]
    consumers: list[str]
    bn: str | None = None
    reason: str | None = None  # set once the channels reach something unsafe


def trace_channel_groups(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    input_size: Sequence[int] | None = None,
    linear: bool = True,
) -> list[ChannelGroup]:
    """Derive the safely prunable channel groups of any ``nn.Module`` from its traced forward pass.

    The model is traced with ``torch.fx``, and the traced graph run once on a fake copy of
    ``example_input`` (shapes only, no compute; a real run in eval mode without gradients only where an
    op cannot run on fake tensors) to read the shapes: a flatten is only accepted where they prove it
    flattens each sample. Training flags are restored afterwards and nothing in the model changes. See
    the module docstring for exactly which convs qualify.

    Args:
        model: the network (not a LightningModule wrapper unless its ``forward`` is the network's).
        example_input: a batch the model accepts. Default: zeros of shape ``(2, *input_size)``.
        input_size: (C, H, W) of one image when ``example_input`` is None; default ``model.input_size``
            if the model has one, else (3, 32, 32) as :func:`lit_prune.core.flops.count_flops`, and
            (3, 224, 224) if the forward fails at 32x32 (AlexNet's pools). Any size at which the forward
            runs gives the same groups: torchvision's ResNets and VGGs run at 32x32 (their adaptive pool
            absorbs the size). Shapes are computed on fake tensors, so a large size costs nothing.
        linear: also return ``Linear -> BatchNorm1d -> ... -> Linear`` groups.

    Returns:
        One :class:`ChannelGroup` per prunable conv or linear layer, in the order of the forward pass,
        named by the producer's module path, with ``conv`` (None for a linear group), its ``bn``, the
        producers (the layer and every BatchNorm on the way) and the consumers; ``branch`` is empty.

    Raises:
        TypeError: the forward pass cannot be traced symbolically or run on the example input; the message
            says how to declare the groups instead.
    """
    traced = _trace(model)
    _propagate_shapes(model, traced, example_input, input_size)
    graph = traced.graph
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    # Parameters that something reads directly, or that two modules share, cannot be sliced safely.
    direct = {node.target for node in graph.nodes if node.op == "get_attr"}
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    def sliceable(path: str) -> str | None:
        """Why the module at ``path`` cannot be sliced as a group member, or None."""
        module = model.get_submodule(path)
        if calls.get(path, 0) != 1:
            return f"{path} is called {calls.get(path, 0)} times"
        if any(t == path or t.startswith(path + ".") for t in direct):
            return f"the parameters of {path} are read directly"
        names = {n for n, _ in module.named_parameters(recurse=False)}
        if not names <= {"weight", "bias"} or any(owners[id(p)] > 1 for p in module.parameters(recurse=False)):
            return f"{path} shares or re-parametrises its weights"
        return None

    groups: list[ChannelGroup] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if type(module) is nn.Conv2d:  # subclasses (QAT, weight-standardised, ...) may compute otherwise
            if module.groups != 1:
                continue
            walk = _walk(model, node, module.out_channels, spatial=True, sliceable=sliceable)
        elif type(module) is nn.Linear and linear:
            walk = _walk(model, node, module.out_features, spatial=False, sliceable=sliceable)
            if walk.reason is None and walk.bn is None:
                walk.reason = "a linear chain without BatchNorm1d has nothing to score"
        else:
            continue
        if walk.reason is None and not walk.consumers:
            walk.reason = "nothing reads its channels"
        if walk.reason is not None:
            log.debug("%s is not prunable: %s", node.target, walk.reason)
            continue
        groups.append(
            ChannelGroup(
                name=node.target,
                producers=tuple(walk.producers),
                consumers=tuple(walk.consumers),
                bn=walk.bn,
                conv=node.target if isinstance(module, nn.Conv2d) else None,
            )
        )
    return groups


# ---- tracing --------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping modules that own buffers opaque.

    fx inlines every module outside ``torch.nn``, evaluating Python conditions on its attributes once, at
    trace time. A module with buffers may branch on their values: ``ChannelSelection`` returns its input
    unchanged while it keeps every channel, so inlined it would vanish from the graph and the channels it
    will index later would look free to cut. As a leaf it is an unknown op, and nothing is cut through it.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or next(m.buffers(recurse=False), None) is not None


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... depending on the code
        raise TypeError(
            f"cannot find the prunable channel groups of {type(model).__name__}: torch.fx could not trace its "
            f"forward ({type(err).__name__}: {err}). Give the model a channel_groups() method returning "
            "lit_prune.core.groups.ChannelGroup items, or build it with lit_prune.models.create_model"
        ) from err


def _propagate_shapes(
    model: nn.Module, graph_module: fx.GraphModule, example_input: torch.Tensor | None, input_size: Sequence[int] | None
) -> None:
    """Record the shape of every tensor in the traced graph (``_shape(node)``), from one fake run.

    Fake tensors carry shapes and no data, so this costs no compute at any input size and leaves the
    model's values untouched. An op that fake tensors cannot run (a data-dependent output shape) falls
    back to one real run, in eval mode without gradients. Training flags are restored module by module.
    """
    if example_input is not None:
        inputs = [example_input]
    else:
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else None
        if input_size is not None or hasattr(model, "input_size"):
            sizes = [tuple(input_size if input_size is not None else model.input_size)]
        else:  # the CIFAR size first, as count_flops; an ImageNet-only model (AlexNet) needs 224
            sizes = [DEFAULT_INPUT_SIZE, IMAGENET_INPUT_SIZE]
        # A batch of 2, so that a reshape keeping dim 0 is told apart from one that folds the batch in.
        inputs = [torch.zeros(2, *s, device=p.device if p is not None else None, dtype=dtype) for s in sizes]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # no BN statistics updated, no dropout
        with torch.no_grad():
            for i, example_input in enumerate(inputs):
                try:
                    _run(graph_module, example_input)
                    break
                except Exception:
                    if i == len(inputs) - 1:
                        raise
    except Exception as err:
        raise TypeError(
            f"cannot find the prunable channel groups of {type(model).__name__}: its traced forward failed on "
            f"inputs of shape {' and '.join(str(tuple(x.shape)) for x in inputs)} ({type(err).__name__}: {err}). "
            "Pass input_size= or example_input= to trace_channel_groups, set model.input_size, or give the "
            "model a channel_groups() method"
        ) from err
    finally:
        for m, training in modes.items():
            m.training = training


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph, storing each tensor result's shape in ``node.meta["lit_prune_shape"]``."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[_SHAPE] = tuple(result.shape)
        return result


def _run(graph_module: fx.GraphModule, example_input: torch.Tensor) -> None:
    # torch logs a failing fake op at ERROR level before raising; we retry or raise a clearer error ourselves
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        # Parameters and buffers enter as fake copies: no compute, and the model's tensors are never written.
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _ShapeRecorder(graph_module).run(mode.from_tensor(example_input))
    except Exception:
        log.debug("shape propagation on fake tensors failed; running the model once")
        _ShapeRecorder(graph_module).run(example_input)
    finally:
        fake_log.setLevel(level)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get(_SHAPE)


# ---- following one producer's channels -------------------------------------------------------------------


def _walk(model: nn.Module, start: fx.Node, channels: int, *, spatial: bool, sliceable) -> _Walk:
    """Follow the ``channels`` output channels of ``start`` to the layers that read them.

    ``repeat`` is None while the channels sit on dim 1 of an (N, C, H, W) map, else the number of
    consecutive columns each channel owns in an (N, C * repeat) matrix. ``zero`` says whether a masked
    channel is still exactly zero at this point.
    """
    walk = _Walk(producers=[start.target], consumers=[])
    walk.reason = sliceable(start.target)
    shape = _shape(start)
    if shape is None or len(shape) != (4 if spatial else 2) or shape[1] != channels:
        walk.reason = walk.reason or f"unexpected output shape {shape}"
    # (node holding the channels, repeat, zero)
    todo: list[tuple[fx.Node, int | None, bool]] = [(start, None if spatial else 1, True)]
    while todo and walk.reason is None:
        node, repeat, zero = todo.pop(0)
        for user in node.users:
            step = _step(model, node, user, channels, repeat, zero, sliceable)
            if isinstance(step, str):
                walk.reason = f"{user.name}: {step}"
                break
            kind, repeat_after, zero_after = step
            if kind == "shape":
                continue
            if kind == "consumer":
                walk.consumers.append(user.target)
                continue
            if kind == "producer":
                walk.producers.append(user.target)
                walk.bn = walk.bn or user.target
            todo.append((user, repeat_after, zero_after))
    return walk


def _step(model: nn.Module, src: fx.Node, user: fx.Node, channels: int, repeat: int | None, zero: bool, sliceable):
    """Classify ``user`` of the channel tensor ``src``.

    Returns:
        ``(kind, repeat, zero)`` after the op, kind one of ``"shape"`` (reads only the shape), ``"consumer"``
        (a layer whose inputs are sliced: the walk stops), ``"producer"`` (a BN, sliced with the group) or
        ``"pass"`` (a channel-wise op); or a string saying why the channels may not go there.
    """
    if user.op == "call_method" and user.target in _SHAPE_METHODS or (
        user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",)
    ):
        return "shape", repeat, zero
    if user.op == "output":
        return "the channels are a model output"
    # The channels must be the op's one tensor input, in first position (x in f(x, ...)).
    others = [n for n in user.all_input_nodes if n is not src]
    if not user.args or user.args[0] is not src or src in user.kwargs.values() or src in user.args[1:]:
        return f"reads the channels as another operand ({user.op} {_name(user.target)})"
    if any(_shape(n) is not None for n in others):
        return f"combines the channels with another tensor ({_name(user.target)})"
    in_shape, out_shape = _shape(src), _shape(user)
    if out_shape is None:
        return f"{_name(user.target)} returns no single tensor"
    if user.op == "call_module":
        return _module_step(model, user, channels, repeat, zero, in_shape, out_shape, sliceable)
    if user.op not in ("call_function", "call_method"):
        return f"unsupported node {user.op}"
    fn = user.target
    if (fn in _ZERO_FUNCTIONS or fn in _ZERO_METHODS) and out_shape == in_shape:
        return "pass", repeat, zero
    if (fn in _NONZERO_FUNCTIONS or fn in _NONZERO_METHODS) and out_shape == in_shape:
        return "pass", repeat, False
    if fn in _POOL_FUNCTIONS:
        return _pool_step(repeat, zero, in_shape, out_shape, channels)
    if fn in _FLATTEN_FUNCTIONS or fn in _FLATTEN_METHODS:
        if fn in (torch.flatten, "flatten") and _flatten_dims(user) != (1, -1):
            return "flattens other dims than (1, -1)"
        return _flatten_step(repeat, zero, in_shape, out_shape, channels)
    if fn in _MEAN_FUNCTIONS or fn == "mean":
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        spatial_dims = isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)
        if repeat is not None or not spatial_dims or sorted(d % 4 for d in dims) != [2, 3]:
            return "a mean over other dims than the spatial ones"
        if out_shape == (in_shape[0], channels, 1, 1):
            return "pass", None, zero
        if out_shape == (in_shape[0], channels):
            return "pass", 1, zero
        return f"unexpected mean shape {out_shape}"
    return f"{_name(fn)} is not a channel-wise op"


def _module_step(model, user, channels, repeat, zero, in_shape, out_shape, sliceable):
    if user.kwargs or len(user.args) != 1:
        return f"module {user.target} takes more than the channels"
    m = model.get_submodule(user.target)
    if isinstance(m, nn.Conv2d):
        if type(m) is not nn.Conv2d or m.groups != 1 or repeat is not None or m.in_channels != channels:
            return f"{user.target} is not a plain groups=1 Conv2d reading {channels} channels"
        if not zero:
            return f"a masked channel would reach {user.target} as a non-zero constant (e.g. sigmoid(0))"
        return sliceable(user.target) or ("consumer", None, zero)
    if isinstance(m, nn.Linear):
        if type(m) is not nn.Linear or repeat is None or m.in_features != channels * repeat:
            return f"{user.target} does not read the {channels} channels as flattened columns"
        if not zero:
            return f"a masked channel would reach {user.target} as a non-zero constant (e.g. sigmoid(0))"
        return sliceable(user.target) or ("consumer", None, zero)
    if type(m) in (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm):  # SyncBatchNorm: either, in a DDP run
        on_maps = type(m) is not nn.BatchNorm1d and repeat is None and len(in_shape) == 4  # (N, C, H, W)
        on_vectors = type(m) is not nn.BatchNorm2d and repeat == 1 and len(in_shape) == 2  # (N, C)
        if not (on_maps or on_vectors) or m.num_features != channels:
            return f"{user.target} does not normalise exactly these {channels} channels"
        if not m.affine:
            return f"{user.target} is not affine, so a mask cannot silence a channel"
        return sliceable(user.target) or ("producer", repeat, True)  # gamma = beta = 0 -> exact zeros
    if isinstance(m, _ZERO_MODULES) and out_shape == in_shape:
        return "pass", repeat, zero
    if isinstance(m, _NONZERO_MODULES) and out_shape == in_shape:
        return "pass", repeat, False
    if isinstance(m, _POOL_MODULES):
        return _pool_step(repeat, zero, in_shape, out_shape, channels)
    if isinstance(m, nn.Flatten):
        if (m.start_dim, m.end_dim) != (1, -1):
            return "flattens other dims than (1, -1)"
        return _flatten_step(repeat, zero, in_shape, out_shape, channels)
    return f"{type(m).__name__} ({user.target}) is not a known channel-wise module"


def _pool_step(repeat, zero, in_shape, out_shape, channels):
    if repeat is not None or len(out_shape) != 4 or out_shape[:2] != (in_shape[0], channels):
        return "a pool that does not keep (N, C, ., .)"
    return "pass", None, zero


def _flatten_step(repeat, zero, in_shape, out_shape, channels):
    """Accept a per-sample flatten: (N, C, H, W) -> (N, C*H*W), or an identity reshape of (N, C*R)."""
    if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
        return f"a reshape to {out_shape} that is not a per-sample flatten of {in_shape}"
    if repeat is None and len(in_shape) == 4 and out_shape[1] == channels * in_shape[2] * in_shape[3]:
        return "pass", in_shape[2] * in_shape[3], zero
    if repeat is not None and out_shape == in_shape:
        return "pass", repeat, zero
    return f"a reshape to {out_shape} that is not a per-sample flatten of {in_shape}"


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    args = list(node.args[1:])  # torch.flatten(x, start_dim=0, end_dim=-1), and x.flatten(...) alike
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start, end


def _name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", repr(target)) if target is not operator.getitem else "indexing"
