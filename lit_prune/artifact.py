"""The pruned artifact: the hand-off between pruning and retraining.

In memory an :class:`Artifact` (with :class:`Architecture`, :class:`FlopsSummary` and :class:`Provenance`);
on disk one file of plain tensors and Python containers only (``torch.load(path, weights_only=True)`` reads
it; no code is ever unpickled), written atomically (temporary file + rename), with a format version.
:meth:`Artifact.to_dict` gives the file's layout and :meth:`Artifact.from_dict` reads it back::

    {
      "format": "lit-prune-artifact", "version": 1,
      "architecture": {"name": "cifar_resnet56", "kwargs": {"cfg": [...], "num_classes": 10}},
                                                # or, outside the zoo: {"name": "torchvision:resnet50",
                                                #   "kwargs": {...}, "edits": [{"path", "kind", "dim", "size",
                                                #   "keep": LongTensor}, ...]}
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

Models outside the zoo (a torchvision or timm network, or a researcher's own) are recorded as the builder that
made them and the cuts surgery made (:func:`lit_prune.core.surgery.edits_of`: per tensor, the indices kept);
loading builds a fresh one and replays the cuts through the same surgery code (:func:`replay_edits`). A file
never makes lit-prune import anything: only zoo names, ``torchvision:<name>`` (``torchvision.models``) and
``timm:<name>`` (``timm.create_model``) are built by name; a ``user:<module>.<name>`` builder is passed in by
the caller, ``load_model(path, builder=make_net)``, and refused otherwise. Version-1 files of zoo models
carry no ``edits`` and read as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune import __version__
from lit_prune.core.flops import count_flops, macs_ratio
from lit_prune.core.masks import apply_masks
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.surgery import edits_of, replay_edits
from lit_prune.io import atomic_save
from lit_prune.methods.state import Counts, cpu_copy
from lit_prune.models import architecture, create_model
from lit_prune.models.external import BUILDER_FN_ATTR, build_recorded, builder_of

FORMAT = "lit-prune-artifact"
VERSION = 1


def _section(d: Any, key: str, where: str, part: str = "it") -> Any:
    """``d[key]``, or a ValueError naming the file (``where``) and the part of it (``part``) that lacks ``key``."""
    if not isinstance(d, Mapping) or key not in d:
        raise ValueError(f"{where} is a malformed lit-prune artifact: {part} has no {key!r}; "
                         "re-run the pruning step that writes it")
    return d[key]


_NOT_REBUILDABLE = (
    "build it with lit_prune.models.create_model('torchvision:<name>' or 'timm:<name>', **its arguments), or "
    "with lit_prune.models.rebuildable(your_builder, **its arguments) (then load_model(path, builder=your_builder)); "
    "or give the pruning callback artifact_path: null to prune it in place without an artifact")


@dataclass(frozen=True)
class Architecture:
    """How to build a model's shapes: a zoo model's name and arguments, or a builder's and the surgery's edits.

    Attributes:
        name: a zoo name (``create_model(name, **kwargs)``), ``torchvision:<name>``, ``timm:<name>``, or
            ``user:<module>.<name>`` (a caller's builder, never imported from the file).
        kwargs: the builder's keyword arguments (plain data).
        edits: for a model outside the zoo, the cuts to replay on the fresh model (:func:`edits_of`).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    edits: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> Architecture:
        """The architecture of ``model``: a zoo model's data, or the builder of any other and its edits.

        Raises:
            ValueError: a model outside the zoo whose builder is unknown, or whose recorded builder and edits
                do not rebuild its shapes; the message says how to build it so that they do.
        """
        if is_zoo_model(model):
            return cls.from_dict(architecture(model))
        edits = tuple(edits_of(model))
        want = _shapes(model)
        tried = []
        for guess in builder_of(model):
            arch = cls(name=guess["name"], kwargs=guess["kwargs"], edits=edits)
            try:
                got = _shapes_of_rebuilt(arch, getattr(model, BUILDER_FN_ATTR, None), want)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                tried.append(f"{arch.name} ({type(err).__name__}: {str(err)[:120]})")
                continue
            if got == want:
                return arch
            tried.append(f"{arch.name}({_call(arch.kwargs)}) has other " + ("shapes" if got else "layers"))
        what = f"tried {'; '.join(tried[:4])}" if tried else "it records no builder and is no torchvision/timm model"
        raise ValueError(f"{type(model).__name__} cannot be written as a pruned artifact: lit-prune cannot rebuild "
                         f"it from a file ({what}). To fix it, {_NOT_REBUILDABLE}")

    def build(self, builder: Callable[..., nn.Module] | None = None) -> nn.Module:
        """A freshly built model of this architecture (a builder's model with the edits replayed on it).

        Args:
            builder: the caller's builder, called as ``builder(**kwargs)``; needed for a ``user:`` name.
        """
        if ":" not in self.name:  # a zoo model
            return create_model(self.name, **self.kwargs)
        model = build_recorded(self.name, self.kwargs, builder)
        replay_edits(model, self.edits)
        return model

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kwargs": dict(self.kwargs)}
        if self.edits:
            d["edits"] = [dict(e) for e in self.edits]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the artifact") -> Architecture:
        name, kwargs = _section(d, "name", where, "its architecture"), _section(d, "kwargs", where, "its architecture")
        if not isinstance(name, str) or not isinstance(kwargs, Mapping):
            raise ValueError(f"{where} is a malformed lit-prune artifact: its architecture is not a model name "
                             "with keyword arguments")
        edits = d.get("edits") or []
        if not isinstance(edits, (list, tuple)) or not all(isinstance(e, Mapping) for e in edits):
            raise ValueError(f"{where} is a malformed lit-prune artifact: its architecture's edits are not a list")
        return cls(name=name, kwargs=dict(kwargs), edits=tuple(dict(e) for e in edits))


def _call(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes_of_rebuilt(arch: Architecture, builder: Callable[..., nn.Module] | None,
                       want: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes ``arch`` rebuilds (empty when the fresh model has other tensors than ``want``: the
    edits keep names), built on the meta device (no memory, no init cost) where the builder works there."""
    device = "meta"
    try:
        with torch.device(device):
            fresh = build_recorded(arch.name, arch.kwargs, builder)
    except (RuntimeError, NotImplementedError):  # a builder that computes with its tensors (.item() on meta)
        device = "cpu"
        fresh = build_recorded(arch.name, arch.kwargs, builder)
    if fresh.state_dict().keys() != want.keys():
        return {}
    replay_edits(fresh, arch.edits)  # its index tensors stay on the CPU; the cut tensors on the model's device
    return _shapes(fresh)


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


def flops_summary(model: nn.Module, dense: Counts | None = None, *, masked: bool = False,
                  input_size: tuple[int, ...] | None = None) -> FlopsSummary:
    """The dense and pruned counts of a pruned (or masked) ``model``: the one place that counts them.

    One rule: the pruned model counts only its non-zero weights when it is ``masked`` (its masks say which
    weights are gone); a physically pruned model counts every weight it has, so a weight that happens to be
    exactly zero (a dead filter) does not change its FLOPs. ``dense`` is the large model's counts (None: the
    model itself, ratio 1). The ratio ``dense MACs / pruned MACs`` is Scratch-B's. ``input_size`` (C, H, W) is
    the data's, the size ``dense`` was counted at (default: the model's own ``input_size``, else 32x32).
    """
    pruned = Counts.of(model, nonzero=masked, input_size=input_size)
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
    input_size: tuple[int, ...] | None = None,
) -> Artifact:
    """Describe a pruned (or masked) model as an :class:`Artifact`.

    Args:
        model: the pruned model (physically smaller, or full size with ``masks``).
        method: name of the pruning method, e.g. ``"l1_norm"``.
        settings: the method's arguments, for provenance.
        source: where the large model came from (a checkpoint path).
        dense: the large model's counts; needed for Scratch-B's ratio.
        masks: parameter masks the next stage must keep enforcing.
        init_state: theta_0 of a lottery-ticket run.
        input_size: (C, H, W) of the data, which the counts are taken at (and ``dense`` was); default the
            model's own ``input_size``, else 32x32.

    Raises:
        ValueError: a model outside the zoo that cannot be rebuilt from a file (see :meth:`Architecture.of`).
    """
    return Artifact(
        architecture=Architecture.of(model),
        input_size=tuple(count_flops(model, input_size).input_size),
        state_dict=cpu_copy(model.state_dict()),
        masks={k: v.detach().cpu().bool() for k, v in (masks or {}).items()},
        flops=flops_summary(model, dense, masked=bool(masks), input_size=input_size),
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
    from lit_prune.io import load_torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"no pruned artifact at {path}; give the path written by a pruning run")
    raw = load_torch(path, "lit-prune artifact", fix="re-run the pruning step that writes it")
    return Artifact.from_dict(raw, where=str(path))


def build_model(
    art: Artifact, *, weights: bool = True, builder: Callable[..., nn.Module] | None = None,
    init: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """The artifact's model, with its weights (and masks applied) unless ``weights=False``.

    Args:
        art: the artifact.
        weights: load its weights; False gives a fresh initialisation of the pruned shapes (the scratch
            regimes): a zoo model's family scheme, any other model its layers' own ``reset_parameters()``
            on the pruned shapes (parameters no layer resets keep the fresh builder's values).
        builder: the network's builder, for an artifact of a ``user:`` builder (never imported from the file).
        init: with ``weights=False``, ``init(model)`` initialises the model instead.

    Raises:
        ValueError: a ``user:`` builder that is not passed, or a builder that builds other shapes.
    """
    model = art.architecture.build(builder)
    if not is_zoo_model(model) and art.input_size is not None:
        model.input_size = tuple(art.input_size)  # the data the artifact was pruned (and counted) for
    if weights:
        load_weights(model, art)
    elif init is not None:
        init(model)
    elif not is_zoo_model(model):
        for m in model.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
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


#: where a Lightning checkpoint of a network outside the zoo, pruned in place during the fit, records the cuts
CHECKPOINT_EDITS = "lit_prune_edits"


def load_checkpoint(cls: type, path: str | os.PathLike, **kwargs: Any) -> Any:
    """A LightningModule of class ``cls`` from a checkpoint written after a pruning callback cut its network.

    ``cls.load_from_checkpoint`` would build the dense network from the saved hyper-parameters and fail on
    the pruned weights' shapes. This builds ``cls(**hyper_parameters, **kwargs)``, replays the recorded cuts on
    its network (found as for the callbacks: ``model``, or the one child holding every parameter) and then
    loads the weights. A checkpoint without cuts loads as it is.

    Raises:
        ValueError: the checkpoint's weights do not fit ``cls``'s network, even after the cuts.
    """
    from lit_prune.callbacks.base import unwrap
    from lit_prune.core.surgery import replay_edits
    from lit_prune.io import load_torch

    ckpt = load_torch(path)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    module = cls(**{**(ckpt.get("hyper_parameters") or {}), **kwargs})
    replay_edits(unwrap(module), ckpt.get(CHECKPOINT_EDITS) or [])
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {cls.__name__} even after its recorded cuts: {str(err)[:300]}") from None
    return module


def load_model(path: str | os.PathLike, *, builder: Callable[..., nn.Module] | None = None) -> nn.Module:
    """A plain ``nn.Module`` from an artifact file, in eval mode.

    Args:
        path: the artifact.
        builder: for a model built by your own function or class (``user:`` in the file): pass it here; it is
            called with the recorded keyword arguments and the recorded cuts are replayed on its model.
    """
    return build_model(load_artifact(path), builder=builder).eval()
