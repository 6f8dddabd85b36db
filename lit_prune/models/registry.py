"""Model registry: every zoo model is built by name from a width config.

A *width config* (``cfg``) is plain data (lists of ints, the string ``"M"`` for a pooling layer,
nested lists of channel indices) that fully describes one architecture of a family. The paper's
pruned models are nothing but named width configs registered next to their family, e.g.
``create_model("cifar_resnet56", cfg="A")`` builds ResNet-56-A.

A named width config may carry other constructor arguments besides ``cfg`` when the architecture needs
them: ResNet-50-2x is ``register_width_config("resnet50", "2x", cfg, select=[...], downsample_bias=True)``.
``create_model(name, cfg="2x")`` then passes those arguments too (arguments given to ``create_model``
explicitly win), and :func:`get_width_config_kwargs` returns all of them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from lit_prune.core.protocols import is_zoo_model

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_WIDTH_CONFIGS: dict[str, dict[str, Any]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``. Duplicate names are refused."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered; pick another name")
        _MODELS[name] = fn
        _WIDTH_CONFIGS.setdefault(name, {})
        return fn

    return wrap


def register_width_config(model: str, name: str, cfg: Any, **extra_kwargs: Any) -> None:
    """Register a named width config (e.g. the paper's ``"A"``) of a registered model.

    Args:
        model: a registered model name.
        name: the config's name, unique per model.
        cfg: the family's width config (plain data).
        **extra_kwargs: other constructor arguments this architecture needs (plain data), e.g. the
            channel selections of ResNet-50-2x; :func:`create_model` passes them along with ``cfg``.

    Raises:
        KeyError: unknown model.
        ValueError: the name is taken, or ``extra_kwargs`` contains ``cfg``.
    """
    if model not in _MODELS:
        raise KeyError(f"unknown model {model!r}; register the model before its width configs")
    if name in _WIDTH_CONFIGS[model]:
        raise ValueError(f"width config {name!r} of {model!r} is already registered")
    if "cfg" in extra_kwargs:
        raise ValueError("give cfg once, as the third argument; extra_kwargs are the other constructor arguments")
    # stored as the constructor kwargs the name stands for
    _WIDTH_CONFIGS[model][name] = {"cfg": cfg, **extra_kwargs}


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def list_width_configs(model: str | None = None) -> dict[str, list[str]]:
    """Named width configs per model (only models that have some, unless ``model`` is given)."""
    if model is not None:
        _check_name(model)
        return {model: sorted(_WIDTH_CONFIGS[model])}
    return {m: sorted(c) for m, c in sorted(_WIDTH_CONFIGS.items()) if c}


def get_width_config(model: str, name: str) -> Any:
    """The ``cfg`` of a named width config (without its extra constructor arguments)."""
    return get_width_config_kwargs(model, name)["cfg"]


def get_width_config_kwargs(model: str, name: str) -> dict[str, Any]:
    """All constructor arguments a named width config stands for: ``{"cfg": ..., **extra_kwargs}`` (a copy)."""
    _check_name(model)
    try:
        return dict(_WIDTH_CONFIGS[model][name])
    except KeyError:
        known = ", ".join(sorted(_WIDTH_CONFIGS[model])) or "none"
        raise KeyError(f"model {model!r} has no width config named {name!r} (known: {known})") from None


def create_model(name: str, *, cfg: Any = None, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name, see :func:`list_models`.
        cfg: the family's width config, or the name of a registered one (e.g. ``"A"``, which also
            brings that config's extra constructor arguments), or None for the unpruned default.
        **kwargs: other constructor arguments (``num_classes``, ...); they win over a named config's.

    Returns:
        The model. Zoo models remember ``name`` and ``kwargs`` (``zoo_name``, ``zoo_kwargs``: with their
        ``arch_kwargs`` they implement :class:`lit_prune.core.protocols.ZooModel`) so that
        :func:`architecture` can describe them after surgery.

    ``torchvision:<name>`` and ``timm:<name>`` build those libraries' models with random weights
    (:func:`lit_prune.models.external.create_external`; ``cfg`` does not apply): they are not zoo models, but
    they remember their builder, so a pruned one is written as an artifact and rebuilt from it.
    """
    if ":" in name:
        from lit_prune.models.external import create_external

        if cfg is not None:
            raise ValueError(f"{name} takes no width config (cfg is for zoo models); prune it instead")
        return create_external(name, **kwargs)
    _check_name(name)
    if isinstance(cfg, str):
        named = get_width_config_kwargs(name, cfg)
        cfg = named.pop("cfg")
        kwargs = {**named, **kwargs}
    model = _MODELS[name](cfg=cfg, **kwargs)
    model.zoo_name = name
    model.zoo_kwargs = dict(kwargs)
    return model


def architecture(model: nn.Module) -> dict[str, Any]:
    """Plain-data description ``{"name", "kwargs"}`` that rebuilds ``model``'s current shapes.

    ``create_model(a["name"], **a["kwargs"])`` returns a fresh model with exactly these shapes.
    """
    if not is_zoo_model(model):
        raise TypeError(
            f"{type(model).__name__} was not built by lit_prune.models.create_model, so it cannot be "
            "described as data; build it with create_model(name, ...)"
        )
    return {"name": model.zoo_name, "kwargs": {**model.zoo_kwargs, **model.arch_kwargs()}}


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = [n for n in _MODELS if name.lower() in n or n in name.lower()]
        hint = f" Did you mean {', '.join(close)}?" if close else " See `python -m lit_prune.flops --list`."
        raise KeyError(f"unknown model {name!r}.{hint} torchvision and timm models are named "
                       "torchvision:<name> / timm:<name> (e.g. torchvision:resnet18, timm:efficientnet_b0)")
