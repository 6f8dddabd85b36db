"""Where a pruning run's inputs come from: the method and the datamodule named by YAML, the large model from a
checkpoint, an artifact or plain weights, and the paper's predefined pruned architectures as artifacts.

The library behind ``python -m lit_prune.prune`` (:mod:`lit_prune.cli.prune`); usable without it::

    method = load_method("configs/methods/l1_resnet56_b.yaml")
    model, init_state = load_source("runs/large/last.ckpt", None, None, None)
    art = method.prune(model.eval(), path="resnet56_b.pt", source="runs/large/last.ckpt", init_state=init_state)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lit_prune.artifact import FORMAT, Artifact, build_model, load_artifact, make_artifact, read_weights
from lit_prune.methods.state import Counts, checkpoint_states
from lit_prune.models import create_model, get_width_config_kwargs

__all__ = ["load_datamodule", "load_method", "load_source", "predefined_artifact"]

def _instantiate(entry: dict[str, Any]) -> Any:
    class_path = entry.get("class_path")
    if not class_path or "." not in class_path:
        raise ValueError(f"method entry needs a class_path such as callbacks.L1FilterPruning, got {entry!r}")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {class_path!r}: {err}") from None
    args = entry.get("init_args") or {}
    known = [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    unknown = [k for k in args if k not in known]
    if unknown and not accepts_any:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, known, n=1)) else "")
                 for k in unknown]
        raise ValueError(f"{class_path} has no argument {', '.join(hints)}; its arguments: {', '.join(known)}")
    return cls(**args)


def load_method(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """The pruning callback described by a YAML file (an entry, or a config with trainer.callbacks), its
    ``init_args`` updated with ``overrides`` (a sweep's prune ratio)."""
    from lit_prune.callbacks.base import PruningCallback  # Lightning: imported only when a method is loaded

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no method config at {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if overrides:
        doc = _with_init_args(doc, overrides, path)
    if "class_path" in doc:
        method = _instantiate(doc)
        if not isinstance(method, PruningCallback):
            raise ValueError(f"{path} names {type(method).__name__}, which is not a pruning method (one of "
                             "lit_prune.callbacks: L1FilterPruning, NetworkSlimming, ...)")
        return method
    entries = (doc.get("trainer") or {}).get("callbacks") or []
    methods = [m for m in (_instantiate(e) for e in entries if isinstance(e, dict)) if isinstance(m, PruningCallback)]
    if len(methods) != 1:
        raise ValueError(f"{path} must describe exactly one pruning callback (class_path + init_args); "
                         f"found {len(methods)}")
    return methods[0]


def _with_init_args(doc: dict[str, Any], overrides: dict[str, Any], path: Path) -> dict[str, Any]:
    """``doc`` whose pruning entry has ``overrides`` merged into its ``init_args`` (the file is left alone)."""
    def merged(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "init_args": {**(entry.get("init_args") or {}), **overrides}}

    if "class_path" in doc:
        return merged(doc)
    entries = (doc.get("trainer") or {}).get("callbacks") or []
    pruning = [i for i, e in enumerate(entries) if isinstance(e, dict) and str(e.get("class_path", "")).startswith(
        ("callbacks.", "lit_prune.callbacks."))]
    if len(pruning) != 1:
        raise ValueError(f"{path}: method arguments {overrides} need exactly one pruning callback entry to apply to; "
                         f"found {len(pruning)}")
    entries = [merged(e) if i == pruning[0] else e for i, e in enumerate(entries)]
    return {**doc, "trainer": {**doc["trainer"], "callbacks": entries}}


def load_datamodule(path: str | Path) -> Any:
    """The datamodule described by a YAML file (a ``class_path``/``init_args`` entry, or a config with ``data:``),
    set up for fitting.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file names no datamodule, or it cannot be imported.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data config at {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    entry = doc if "class_path" in doc else doc.get("data")
    if not isinstance(entry, dict) or "class_path" not in entry:
        raise ValueError(f"{path} must name a datamodule: class_path and init_args, at the top level or under data:")
    datamodule = _instantiate(entry)
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    return datamodule


def _read_checkpoint(path: str) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name the file and say what is wrong with it."""
    from lit_prune.io import load_torch

    return load_torch(path, fix="give a Lightning checkpoint or a pruned artifact")


def _mismatch(err: RuntimeError) -> str:
    """``load_state_dict``'s error in one line: how many keys are missing or unexpected, the first few named."""
    import re

    parts = []
    for kind in ("Missing", "Unexpected"):
        m = re.search(rf"{kind} key\(s\) in state_dict: (.*)", str(err))
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {kind.lower()} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    shapes = re.findall(r"size mismatch for ([^:]+):", str(err))
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''})")
    return "; ".join(parts) or str(err)


def load_source(
    checkpoint: str | None, arch: str | None, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The large model (a Lightning checkpoint, an artifact, or a zoo arch with a plain state dict) and the
    theta_0 it carries, if any (a lottery-ticket run's callback state, or an artifact's ``init_state``)."""
    if checkpoint is not None:
        obj = _read_checkpoint(checkpoint)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            art = load_artifact(checkpoint)
            return build_model(art), art.init_state
        if not isinstance(obj, dict) or "state_dict" not in obj or "hyper_parameters" not in obj:
            raise ValueError(f"{checkpoint} is neither a Lightning checkpoint of lit-prune nor an artifact")
        from lit_prune.module import ImageClassifier

        # theta_0 of a lottery-ticket run: its callback's state, or a retrained ticket's own (the module's)
        init = next((s.init_state for s in checkpoint_states(obj) if s.init_state is not None), None)
        return ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").model, init
    if arch is None or weights is None:
        raise ValueError("give --checkpoint, or --arch with --weights (a state dict, e.g. torchvision's)")
    model = create_model(arch, **({"num_classes": num_classes} if num_classes else {}))
    try:
        model.load_state_dict(read_weights(weights))
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match {arch}: {_mismatch(err)}") from None
    return model, None


def predefined_artifact(arch: str, width_config: str, num_classes: int | None = None) -> Artifact:
    """An architecture-only artifact of a named width config (a paper's predefined pruned model).

    Args:
        arch: zoo model name, e.g. ``"resnet50"``.
        width_config: one of its registered width configs, e.g. ``"thinet70"``.
        num_classes: classifier outputs; None for the builder's default.

    Returns:
        The artifact: fresh weights, method ``"predefined"``, dense FLOPs of ``arch``'s default widths.

    Raises:
        KeyError: unknown model or width config (the message lists the known ones).
    """
    get_width_config_kwargs(arch, width_config)  # a clear KeyError before building anything
    extra = {"num_classes": num_classes} if num_classes else {}
    dense = Counts.of(create_model(arch, **extra))
    model = create_model(arch, cfg=width_config, **extra)
    settings = {"arch": arch, "width_config": width_config, "weights": "fresh initialisation, none inherited"}
    return make_artifact(model, method="predefined", settings=settings, source=None,
                         dense=dense)
