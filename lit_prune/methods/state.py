"""The one owner of pruning state: masks, theta_0, the dense model's counts and the schedule position.

A :class:`PruneState` is held by a pruning callback while it prunes, and by the LightningModule when a run
starts from a masked artifact; both save it with :meth:`PruneState.state_dict`, in one format, and both
enforce its masks through :meth:`PruneState.before_optimizer_step` / :meth:`PruneState.after_optimizer_step`.

Plain PyTorch: no Lightning here, so the state can be tested and reused outside a Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_prune.core.flops import count_flops
from lit_prune.core.masks import Masks, apply_masks, mask_gradients

#: where the LightningModule keeps its state in a checkpoint (a callback's goes under its ``state_key``)
CHECKPOINT_KEY = "lit_prune"
#: the keys an older lit-prune wrote: ImageClassifier's two, and every callback's own layout
_LEGACY_MODULE_KEYS = {"masks": "lit_prune_masks", "init_state": "lit_prune_init_state"}


@dataclass(frozen=True)
class Counts:
    """Multiply-accumulates and parameters of a model (conv and linear layers; see ``core.flops``)."""

    macs: int
    params: int

    def to_dict(self) -> dict[str, int]:
        return {"macs": int(self.macs), "params": int(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Counts:
        return cls(macs=int(d["macs"]), params=int(d["params"]))

    @classmethod
    def of(cls, model: nn.Module, *, nonzero: bool = False, input_size: tuple[int, ...] | None = None) -> Counts:
        """Count ``model`` (``nonzero``: only the non-zero weights, for masked models)."""
        report = count_flops(model, nonzero=nonzero, **({"input_size": input_size} if input_size else {}))
        return cls(macs=report.macs, params=report.params)


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (what checkpoints and artifacts store)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _snapshot(value: Any) -> Any:
    """A CPU copy of plain values and tensors, nested in dicts and lists (later in-place updates do not leak)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


@dataclass
class PruneState:
    """Masks, theta_0, the dense counts and the schedule position of one pruning run.

    Attributes:
        masks: ``{parameter name: bool tensor}``, enforced on weights, gradients and momentum.
        init_state: the initialisation theta_0 (lottery tickets), or None.
        dense: the unpruned model's counts, recorded once before anything is pruned.
        input_size: (C, H, W) of the data the counts are taken at (the datamodule's ``input_size``, or the
            one given explicitly), recorded with ``dense`` so that the pruned counts use the same size; None:
            the model's own ``input_size``, else 32x32.
        schedule: the method's position in its schedule (plain values and tensors), e.g. the current
            sparsity of gradual magnitude pruning, SFP's last re-prune epoch, SSS's APG velocities.
    """

    masks: Masks = field(default_factory=dict)
    init_state: dict[str, torch.Tensor] | None = None
    dense: Counts | None = None
    schedule: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None

    # ---- recording -----------------------------------------------------------------------------------
    def record_dense(self, measure: Callable[[], Counts]) -> Counts:
        """The dense counts: ``measure()`` the first time (a forward pass), the recorded ones after that."""
        if self.dense is None:
            self.dense = measure()
        return self.dense

    def record_input_size(self, size: Sequence[int] | None) -> tuple[int, ...] | None:
        """The input size of the counts: ``size`` until the dense counts are recorded, then the recorded one
        (a resumed run counts its pruned model at the size its dense model was counted at)."""
        if self.dense is None and size is not None:
            self.input_size = tuple(int(s) for s in size)
        return self.input_size

    def capture_init(self, model: nn.Module) -> None:
        """Save theta_0 once: a resumed run keeps the true initialisation."""
        if self.init_state is None:
            self.init_state = cpu_copy(model.state_dict())

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = {k: v.detach().cpu().bool() for k, v in masks.items()}

    # ---- enforcement ---------------------------------------------------------------------------------
    def before_optimizer_step(self, model: nn.Module) -> None:
        """Mask the gradients, so a pruned weight gets no update."""
        if self.masks:
            mask_gradients(model, self.masks)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights and their momentum (weight decay and momentum would revive them)."""
        if self.masks:
            apply_masks(model, self.masks, optimizer)

    # ---- serialisation -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "init_state": self.init_state,
            "dense": self.dense.to_dict() if self.dense is not None else None,
            "schedule": _snapshot(self.schedule),
            "input_size": list(self.input_size) if self.input_size is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`, or from the layout an older lit-prune wrote.

        Older callbacks saved ``masks``, ``dense_counts``, ``init_state`` and their schedule keys side by
        side; those schedule keys become :attr:`schedule`.
        """
        self.masks = {k: v.bool() for k, v in (state.get("masks") or {}).items()}
        self.init_state = state.get("init_state")
        dense = state.get("dense", state.get("dense_counts"))
        self.dense = Counts.from_dict(dense) if dense is not None else None
        size = state.get("input_size")
        self.input_size = tuple(int(s) for s in size) if size else None
        if "schedule" in state:
            self.schedule = dict(state["schedule"])
        else:
            known = {"masks", "init_state", "dense", "dense_counts", "input_size"}
            self.schedule = {k: v for k, v in state.items() if k not in known}

    @classmethod
    def from_module_checkpoint(cls, checkpoint: Mapping[str, Any]) -> PruneState | None:
        """The LightningModule's state in a checkpoint (this format or the two keys of older versions)."""
        if CHECKPOINT_KEY in checkpoint:
            state = cls()
            state.load_state_dict(checkpoint[CHECKPOINT_KEY])
            return state
        legacy = {k: checkpoint[old] for k, old in _LEGACY_MODULE_KEYS.items() if old in checkpoint}
        if not legacy:
            return None
        state = cls()
        state.load_state_dict(legacy)
        return state


def checkpoint_states(checkpoint: Mapping[str, Any]) -> Iterator[PruneState]:
    """Every pruning state a Lightning checkpoint holds: each pruning callback's, then the module's."""
    for value in (checkpoint.get("callbacks") or {}).values():
        if isinstance(value, Mapping) and "masks" in value:
            state = PruneState()
            state.load_state_dict(value)
            yield state
    module = PruneState.from_module_checkpoint(checkpoint)
    if module is not None:
        yield module
