"""The pruned artifact: the hand-off between pruning and retraining.

In memory an :class:`Artifact` (with :class:`Architecture`, :class:`FlopsSummary` and :class:`Provenance`);
on disk one file of plain tensors and Python containers only (``torch.load(path, weights_only=True)`` reads
it; no code is ever unpickled), written atomically (temporary file + rename), with a format version.
:meth:`Artifact.to_dict` gives the file's layout and :meth:`Artifact.from_dict` reads it back::

    {
      "format": "lit-prune-artifact", "version": 1,
      "architecture": {"name": "cifar_resnet56", "kwargs": {"cfg": [...], "num_classes": 10}},
      "input_size": [3, 32, 32],
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune import __version__
from lit_prune.core.flops import count_flops, macs_ratio
from lit_prune.core.masks import apply_masks
from lit_prune.io import atomic_save
from lit_prune.methods.state import Counts, cpu_copy
from lit_prune.models import architecture, create_model

FORMAT = "lit-prune-artifact"
VERSION = 1


def _section(d: Any, key: str, where: str, part: str = "it") -> Any:
    """``d[key]``, or a ValueError naming the file (``where``) and the part of it (``part``) that lacks ``key``."""
    if not isinstance(d, Mapping) or key not in d:
        raise ValueError(f"{where} is a malformed lit-prune artifact: {part} has no {key!r}; "
                         "re-run the pruning step that writes it")
    return d[key]


@dataclass(frozen=True)
class Architecture:
    """A zoo model's name and builder arguments: ``create_model(name, **kwargs)`` rebuilds its shapes."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> Architecture:
        """The architecture of a zoo model (``TypeError`` for a model outside the zoo)."""
        return cls.from_dict(architecture(model))

    def build(self) -> nn.Module:
        """A freshly initialised model of this architecture."""
        return create_model(self.name, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the artifact") -> Architecture:
        name, kwargs = _section(d, "name", where, "its architecture"), _section(d, "kwargs", where, "its architecture")
        if not isinstance(name, str) or not isinstance(kwargs, Mapping):
            raise ValueError(f"{where} is a malformed lit-prune artifact: its architecture is not a model name "
                             "with keyword arguments")
        return cls(name=name, kwargs=dict(kwargs))


@dataclass(frozen=True)
class FlopsSummary:
    """The large (dense) and the pruned model's counts; :attr:`ratio` is Scratch-B's r."""

    dense: Counts
    pruned: Counts

    @property
    def ratio(self) -> float:
        """``dense MACs / pruned MACs`` (see :func:`lit_prune.core.flops.macs_ratio`)."""
        return macs_ratio(self.dense.macs, self.pruned.macs)

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.to_dict(), "pruned": self.pruned.to_dict(), "ratio": self.ratio}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the artifact") -> FlopsSummary:
        """The counts of ``d``; its stored ``ratio`` is the same formula of them, so it is recomputed."""
        counts = {}
        for key in ("dense", "pruned"):
            part = _section(d, key, where, "its flops")
            counts[key] = Counts(macs=int(_section(part, "macs", where, f"its flops.{key}")),
                                 params=int(_section(part, "params", where, f"its flops.{key}")))
        return cls(**counts)


@dataclass(frozen=True)
class Provenance:
    """Where an artifact came from: the method and its settings, the source checkpoint, when and by what."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    created: str | None = None
    lit_prune_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "settings": dict(self.settings), "source": self.source,
                "created": self.created, "lit_prune_version": self.lit_prune_version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the artifact") -> Provenance:
        method = _section(d, "method", where, "its provenance")
        return cls(method=method, settings=dict(d.get("settings") or {}), source=d.get("source"),
                   created=d.get("created"), lit_prune_version=d.get("lit_prune_version"))


@dataclass(frozen=True)
class Artifact:
    """A pruned (or masked) zoo model, its counts and its provenance; see the module docstring for the file.

    Attributes:
        architecture: what to build (``build_model`` does, with the weights).
        input_size: the input the counts were taken at, e.g. ``(3, 32, 32)`` (None: the model's own).
        state_dict: the pruned model's weights (CPU tensors).
        masks: parameter masks the next stage keeps enforcing (empty for physically pruned models).
        flops: dense and pruned counts and their ratio.
        provenance: method, settings, source, creation time and lit-prune version.
        init_state: theta_0 of a lottery-ticket run, else None.
    """

    architecture: Architecture
    input_size: tuple[int, ...] | None
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    flops: FlopsSummary
    provenance: Provenance
    init_state: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout (format version 1): plain containers and tensors only."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "architecture": self.architecture.to_dict(),
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "state_dict": dict(self.state_dict),
            "masks": dict(self.masks),
            "flops": self.flops.to_dict(),
            "provenance": self.provenance.to_dict(),
            "init_state": dict(self.init_state) if self.init_state is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "the artifact") -> Artifact:
        """Validate and read the on-disk layout (``where`` names the file in errors).

        Raises:
            ValueError: ``d`` is not an artifact, of an unknown format version, or misses a part.
        """
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"{where} is not a lit-prune artifact (a Lightning checkpoint? use --ckpt_path for "
                             "those)")
        if d.get("version") != VERSION:
            raise ValueError(f"{where} has artifact format version {d.get('version')}; this lit-prune reads "
                             f"{VERSION}")
        state_dict = _section(d, "state_dict", where)
        masks, init_state = d.get("masks") or {}, d.get("init_state")
        for key, value in (("state_dict", state_dict), ("masks", masks), ("init_state", init_state or {})):
            if not isinstance(value, Mapping) or not all(isinstance(t, torch.Tensor) for t in value.values()):
                raise ValueError(f"{where} is a malformed lit-prune artifact: its {key!r} is not a dict of tensors")
        size = d.get("input_size")
        return cls(
            architecture=Architecture.from_dict(_section(d, "architecture", where), where),
            input_size=tuple(int(s) for s in size) if size else None,
            state_dict=dict(state_dict),
            masks=dict(masks),
            flops=FlopsSummary.from_dict(_section(d, "flops", where), where),
            provenance=Provenance.from_dict(_section(d, "provenance", where), where),
            init_state=dict(init_state) if init_state is not None else None,
        )


def flops_summary(model: nn.Module, dense: Counts | None = None, *, masked: bool = False) -> FlopsSummary:
    """The dense and pruned counts of a pruned (or masked) ``model``: the one place that counts them.

    One rule: the pruned model counts only its non-zero weights when it is ``masked`` (its masks say which
    weights are gone); a physically pruned model counts every weight it has, so a weight that happens to be
    exactly zero (a dead filter) does not change its FLOPs. ``dense`` is the large model's counts (None: the
    model itself, ratio 1). The ratio ``dense MACs / pruned MACs`` is Scratch-B's.
    """
    pruned = Counts.of(model, nonzero=masked)
    return FlopsSummary(dense=dense if dense is not None else pruned, pruned=pruned)


def make_artifact(
    model: nn.Module,
    *,
    method: str,
    settings: Mapping[str, Any] | None = None,
    source: str | None = None,
    dense: Counts | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
) -> Artifact:
    """Describe a pruned (or masked) zoo model as an :class:`Artifact`.

    Args:
        model: the pruned model (physically smaller, or full size with ``masks``).
        method: name of the pruning method, e.g. ``"l1_norm"``.
        settings: the method's arguments, for provenance.
        source: where the large model came from (a checkpoint path).
        dense: the large model's counts; needed for Scratch-B's ratio.
        masks: parameter masks the next stage must keep enforcing.
        init_state: theta_0 of a lottery-ticket run.
    """
    return Artifact(
        architecture=Architecture.of(model),
        input_size=tuple(count_flops(model).input_size),
        state_dict=cpu_copy(model.state_dict()),
        masks={k: v.detach().cpu().bool() for k, v in (masks or {}).items()},
        flops=flops_summary(model, dense, masked=bool(masks)),
        provenance=Provenance(method=method, settings=dict(settings or {}), source=source,
                              created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), lit_prune_version=__version__),
        init_state=cpu_copy(init_state) if init_state is not None else None,
    )


def save_artifact(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write an artifact atomically, in its on-disk layout (:meth:`Artifact.to_dict`)."""
    return atomic_save(artifact.to_dict(), path)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and validate an artifact (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is corrupted, not an artifact, of an unknown format version, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pruned artifact at {path}; give the path written by a pruning run")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding code
        raise ValueError(f"{path} is not a readable lit-prune artifact ({type(err).__name__}: {err}); "
                         "re-run the pruning step that writes it") from err
    return Artifact.from_dict(raw, where=str(path))


def build_model(art: Artifact, *, weights: bool = True) -> nn.Module:
    """The artifact's model, with its weights (and masks applied) unless ``weights=False``."""
    model = art.architecture.build()
    if weights:
        load_weights(model, art)
    return model


def load_weights(model: nn.Module, art: Artifact) -> None:
    """Load the artifact's weights into ``model``, refusing a model of another shape with a clear message."""
    try:
        model.load_state_dict(art.state_dict)
    except RuntimeError as err:
        arch = art.architecture
        raise ValueError(
            f"the pruned artifact ({arch.name}, {arch.kwargs}) does not match this "
            f"{type(model).__name__}: build the model from the artifact (lit_prune.artifact.build_model) "
            f"instead of passing another architecture.\n{err}"
        ) from None
    if art.masks:
        apply_masks(model, art.masks)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's state dict from a lit-prune Lightning checkpoint or a plain (e.g. torchvision) one.

    Lightning's ``model.`` prefix and DataParallel's ``module.`` prefixes are removed.
    """
    from lit_prune.io import load_torch

    state = load_torch(path, "weights file")
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
