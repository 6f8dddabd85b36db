"""Models outside the zoo, built by name: ``torchvision:<name>`` and ``timm:<name>``, and a caller's own builder.

A network that should survive as a pruned artifact must say how it was built, so that loading the file can
build a fresh one and replay the surgery on it (:mod:`lit_prune.artifact`). This module is where that is
recorded: every model built here carries ``lit_prune_builder = {"name": ..., "kwargs": ...}`` (plain data)::

    from lit_prune.models import create_model
    net = create_model("torchvision:resnet50", num_classes=100)      # torchvision.models.resnet50, weights=None
    net = create_model("timm:efficientnet_b0", num_classes=10)       # timm.create_model, pretrained=False
    net = rebuildable(MyNet, width=64)                                # your own class or function

Weights are always random (``weights=None`` / ``pretrained=False``): nothing is ever downloaded. A network a
user built directly (``torchvision.models.resnet18(num_classes=10)``, ``timm.create_model(...)``) is recognised
by :func:`builder_of` (its class among torchvision's builders, timm's ``pretrained_cfg``), and the artifact
checks that the guess rebuilds its exact shapes before it writes anything.

Loading never imports what a file names: only torchvision's and timm's own builders are looked up by name;
a caller's builder (``"user:<module>.<name>"`` in the file) must be passed in by the caller.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

#: the attribute that records how a network was built (plain data: name and keyword arguments)
BUILDER_ATTR = "lit_prune_builder"
#: the caller's builder itself (in memory only, never written): lets an export check that it rebuilds the model
BUILDER_FN_ATTR = "_lit_prune_builder_fn"
#: the prefixes a name may carry; ``user:`` names a caller's builder, which is never imported from a file
PREFIXES = ("torchvision", "timm", "user")

_FIND_NAMES = ("torchvision: python -c 'import torchvision; print(torchvision.models.list_models())'; "
               "timm: python -c 'import timm; print(timm.list_models(\"resnet*\"))'")


def is_external_name(name: str) -> bool:
    """Whether ``name`` names a torchvision or timm builder (``torchvision:resnet18``), not a zoo model."""
    return isinstance(name, str) and name.partition(":")[0] in ("torchvision", "timm") and ":" in name


def _plain(value: Any, where: str) -> Any:
    """``value`` if it is plain data (what ``torch.load(weights_only=True)`` reads back), else a ValueError."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}: builder arguments must be finite numbers")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"{where} is a {type(value).__name__}: an artifact records builder arguments as plain data "
                     "(numbers, strings, lists, dicts); wrap the construction in a function of plain arguments")


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    from torchvision import models

    known = models.list_models(module=models)  # the classification builders
    if name not in known:
        close = [n for n in known if name.lower() in n][:8]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown torchvision model {name!r}.{hint} List the names with {_FIND_NAMES}")
    return models.get_model_builder(name)


def _timm_create(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm:{name} needs timm: pip install 'lit-prune[timm]'") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown timm model {name!r}.{hint} List the names with {_FIND_NAMES}")
    return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)


def _default_input_size(prefix: str, name: str, model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """(C, H, W) the builder's model is made for: torchvision's weights' crop size, timm's ``pretrained_cfg``."""
    if prefix == "timm":
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
        img = kwargs.get("img_size")
        if img is not None:  # an explicit img_size wins over the pretrained default
            hw = (img, img) if isinstance(img, int) else tuple(img)
            size = (int(kwargs.get("in_chans", size[0])), *hw)
        return tuple(int(s) for s in size)
    from torchvision import models

    try:
        crop = list(models.get_model_weights(name))[0].transforms().crop_size[0]
    except Exception:  # a builder without registered weights: ImageNet's usual crop
        crop = 224
    return (3, int(crop), int(crop))


def create_external(name: str, **kwargs: Any) -> nn.Module:
    """``torchvision:<name>`` or ``timm:<name>`` with random weights, recording how it was built.

    Args:
        name: ``torchvision:resnet18``, ``timm:efficientnet_b0``, ...
        **kwargs: the builder's keyword arguments (``num_classes``, ``width_mult``, ...), plain data; ``weights``
            and ``pretrained`` are refused (nothing is downloaded).

    Returns:
        The network, with ``lit_prune_builder`` and ``input_size`` (C, H, W) set.

    Raises:
        KeyError: an unknown name (the message says how to list the known ones).
        ValueError: a non-plain argument, or ``weights``/``pretrained``.
    """
    prefix, _, short = name.partition(":")
    if not is_external_name(name) or not short:
        raise KeyError(f"{name!r} is not a torchvision:<name> or timm:<name> model name. List the names with "
                       f"{_FIND_NAMES}")
    for banned in ("weights", "pretrained"):
        if kwargs.get(banned):
            raise ValueError(f"{name}: {banned}= is not supported (lit-prune never downloads weights); build it "
                             "with random weights and load a state dict (python -m lit_prune.prune --weights)")
        kwargs.pop(banned, None)
    kwargs = _plain(dict(kwargs), f"{name} arguments")
    fn = _torchvision_builder(short) if prefix == "torchvision" else _timm_create(short)
    model = fn(**kwargs) if prefix == "timm" else fn(weights=None, **kwargs)
    setattr(model, BUILDER_ATTR, {"name": name, "kwargs": kwargs})
    model.input_size = _default_input_size(prefix, short, model, kwargs)
    return model


def rebuildable(builder: Callable[..., nn.Module], /, **kwargs: Any) -> nn.Module:
    """``builder(**kwargs)``, remembered so that its pruned artifact can be rebuilt.

    The artifact records ``user:<module>.<name>`` and ``kwargs`` (plain data); lit-prune never imports that
    name from a file, so load it with ``load_model(path, builder=builder)``.

    Raises:
        ValueError: ``kwargs`` are not plain data, or ``builder`` returns no ``nn.Module``.
    """
    kwargs = _plain(dict(kwargs), f"{getattr(builder, '__name__', 'builder')} arguments")
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{builder!r} returned a {type(model).__name__}, not an nn.Module")
    setattr(model, BUILDER_ATTR, {"name": f"user:{_qualname(builder)}", "kwargs": kwargs})
    object.__setattr__(model, BUILDER_FN_ATTR, builder)
    return model


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def builder_of(model: nn.Module) -> list[dict[str, Any]]:
    """How ``model`` may have been built, most likely first: its record, else guesses from its class.

    A record (:func:`create_external`, :func:`rebuildable`) is the one answer. Without one: a timm model's
    ``pretrained_cfg`` names its architecture; a torchvision model's class is matched against torchvision's
    builders of that class. ``num_classes`` comes from the model (its ``num_classes``, else its last
    ``nn.Linear``); other arguments cannot be guessed: the caller checks each guess by rebuilding it.
    """
    record = getattr(model, BUILDER_ATTR, None)
    if isinstance(record, Mapping) and "name" in record:
        return [{"name": record["name"], "kwargs": dict(record.get("kwargs") or {})}]
    cls = type(model)
    cfg = getattr(model, "pretrained_cfg", None)
    if cls.__module__.startswith("timm.") and isinstance(cfg, Mapping) and cfg.get("architecture"):
        kwargs: dict[str, Any] = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img is not None and tuple(img) != tuple(cfg.get("input_size", (0, 0, 0))[1:]):
            kwargs["img_size"] = list(img)
        return [{"name": f"timm:{cfg['architecture']}", "kwargs": kwargs}]
    if cls.__module__.startswith("torchvision.models"):
        from torchvision import models

        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classes = getattr(model, "num_classes", None)  # SqueezeNet's classifier is a conv
        classes = classes if isinstance(classes, int) else linears[-1].out_features if linears else None
        kwargs = {"num_classes": classes} if classes is not None else {}
        out = []
        for name in models.list_models(module=models):
            returns = inspect.signature(models.get_model_builder(name)).return_annotation
            if getattr(returns, "__name__", returns) == cls.__name__:
                out.append({"name": f"torchvision:{name}", "kwargs": dict(kwargs)})
        return out
    return []


def build_recorded(name: str, kwargs: Mapping[str, Any], builder: Callable[..., nn.Module] | None = None,
                   where: str = "the artifact") -> nn.Module:
    """A fresh network from a recorded builder name and arguments (what an artifact holds).

    Only torchvision's and timm's builders are looked up by name; any other builder (``user:...``) must be
    passed in as ``builder``, which is called as ``builder(**kwargs)`` (and wins over a recorded
    torchvision/timm name too).

    Raises:
        ValueError: a ``user:`` name without ``builder``; the message names the option.
    """
    if builder is not None:
        model = builder(**dict(kwargs))
        if not isinstance(model, nn.Module):
            raise ValueError(f"builder {builder!r} returned a {type(model).__name__}, not an nn.Module")
        setattr(model, BUILDER_ATTR, {"name": name, "kwargs": dict(kwargs)})
        object.__setattr__(model, BUILDER_FN_ATTR, builder)
        return model
    if is_external_name(name):
        return create_external(name, **dict(kwargs))
    label = name.removeprefix("user:")
    raise ValueError(f"{where} was built by {label}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}), a "
                     "builder lit-prune does not import from a file (that would run code the file names): pass "
                     f"it yourself, load_model(path, builder={label.rpartition('.')[2]}) / "
                     f"build_model(artifact, builder=...), or from the CLI --model.builder {label}")
