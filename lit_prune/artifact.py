"""The pruned artifact: the hand-off between pruning and retraining.

One file, plain tensors and Python containers only (``torch.load(path, weights_only=True)`` reads it;
no code is ever unpickled), written atomically (temporary file + rename), with a format version::

    {
      "format": "lit-prune-artifact", "version": 1,
      "architecture": {"name": "cifar_resnet56", "kwargs": {"cfg": [...], "num_classes": 10}},
      "state_dict": {...},                      # weights of the pruned model
      "masks": {"param name": bool tensor},     # masked methods only (unstructured, SFP, lottery)
      "flops": {"dense": {"macs", "params"}, "pruned": {"macs", "params"}, "ratio": float},
      "provenance": {"method", "settings", "source", "created", "lit_prune_version"},
      "init_state": None | {...},               # theta_0 for lottery tickets
    }

Load it without Lightning in two lines::

    from lit_prune.artifact import load_model
    model = load_model("pruned.pt")
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune import __version__
from lit_prune.core.flops import count_flops, macs_ratio
from lit_prune.core.masks import apply_masks
from lit_prune.io import atomic_save
from lit_prune.models import architecture, create_model

FORMAT = "lit-prune-artifact"
VERSION = 1


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def flops_summary(model: nn.Module, dense: Mapping[str, int] | None = None) -> dict[str, Any]:
    """``{"dense", "pruned": {"macs", "params"}, "ratio"}`` of a pruned (or masked) ``model``.

    The pruned model counts its non-zero weights only (masked methods); ``dense`` is the large model's
    counts (None: the model itself, ratio 1). The ratio ``dense MACs / pruned MACs`` is Scratch-B's.
    """
    report = count_flops(model, nonzero=True)
    pruned = {"macs": report.macs, "params": report.params}
    dense = dict(dense) if dense is not None else pruned
    return {"dense": dense, "pruned": pruned, "ratio": macs_ratio(dense["macs"], pruned["macs"])}


def make_artifact(
    model: nn.Module,
    *,
    method: str,
    settings: Mapping[str, Any] | None = None,
    source: str | None = None,
    dense: Mapping[str, int] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Describe a pruned (or masked) zoo model as an artifact dict.

    Args:
        model: the pruned model (physically smaller, or full size with ``masks``).
        method: name of the pruning method, e.g. ``"l1_norm"``.
        settings: the method's arguments, for provenance.
        source: where the large model came from (a checkpoint path).
        dense: ``{"macs", "params"}`` of the large model; needed for Scratch-B's ratio.
        masks: parameter masks the next stage must keep enforcing.
        init_state: theta_0 of a lottery-ticket run.
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture(model),
        "input_size": list(count_flops(model).input_size),
        "state_dict": _cpu(model.state_dict()),
        "masks": {k: v.detach().cpu().bool() for k, v in (masks or {}).items()},
        "flops": flops_summary(model, dense),
        "provenance": {
            "method": method,
            "settings": dict(settings or {}),
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "lit_prune_version": __version__,
        },
        "init_state": _cpu(init_state) if init_state is not None else None,
    }


def save_artifact(artifact: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write an artifact atomically."""
    return atomic_save(dict(artifact), path)


def load_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate an artifact (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is corrupted, not an artifact, or of an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pruned artifact at {path}; give the path written by a pruning run")
    try:
        art = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding code
        raise ValueError(f"{path} is not a readable lit-prune artifact ({type(err).__name__}: {err}); "
                         "re-run the pruning step that writes it") from err
    if not isinstance(art, dict) or art.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lit-prune artifact (a Lightning checkpoint? use --ckpt_path for those)")
    if art.get("version") != VERSION:
        raise ValueError(f"{path} has artifact format version {art.get('version')}; this lit-prune reads {VERSION}")
    return art


def build_model(art: Mapping[str, Any], *, weights: bool = True) -> nn.Module:
    """The artifact's model, with its weights (and masks applied) unless ``weights=False``."""
    arch = art["architecture"]
    model = create_model(arch["name"], **arch["kwargs"])
    if weights:
        load_weights(model, art)
    return model


def load_weights(model: nn.Module, art: Mapping[str, Any]) -> None:
    """Load the artifact's weights into ``model``, refusing a model of another shape with a clear message."""
    try:
        model.load_state_dict(art["state_dict"])
    except RuntimeError as err:
        arch = art["architecture"]
        raise ValueError(
            f"the pruned artifact ({arch['name']}, {arch['kwargs']}) does not match this "
            f"{type(model).__name__}: build the model from the artifact (lit_prune.artifact.build_model) "
            f"instead of passing another architecture.\n{err}"
        ) from None
    if art.get("masks"):
        apply_masks(model, art["masks"])


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's state dict from a lit-prune Lightning checkpoint or a plain (e.g. torchvision) one.

    Lightning's ``model.`` prefix and DataParallel's ``module.`` prefixes are removed.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        raise ValueError(f"{path} is a pruned artifact; load it with build_model/load_model")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
        if any(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return {k.removeprefix("module.").replace(".module.", "."): v for k, v in state.items()}


def load_model(path: str | os.PathLike) -> nn.Module:
    """A plain ``nn.Module`` from an artifact file, in eval mode."""
    return build_model(load_artifact(path)).eval()
