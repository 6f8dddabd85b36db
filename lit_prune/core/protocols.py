"""What core expects of a model's structure, as typed protocols (no Lightning, no import of the zoo).

Core never looks a model's structure up by attribute name: a model (or one of its blocks) takes part in a
feature by implementing one of these protocols, and core asks ``isinstance(obj, Protocol)``. The zoo
(:mod:`lit_prune.models`) implements them structurally -- its classes do not inherit from them -- and
``tests/models/test_protocols.py`` checks every registered model against the protocols of its family.

* :class:`ZooModel` -- built by :func:`lit_prune.models.create_model`, so that data rebuilds it
  (:func:`is_zoo_model` is the one test for it);
* :class:`DeclaresChannelGroups` -- declares its prunable groups instead of having them traced;
* :class:`ResidualBlock` -- a block whose branch ends in one conv (He et al.'s shortcut compensation);
* :class:`GatedBlock` -- a block that can carry an SSS factor and names where it folds;
* :class:`CompactsBlocks` -- a model whose block names must stay contiguous after a branch vanishes;
* :class:`ChannelSamplers` -- a model whose residual blocks can read a selection of their inputs.

The checks are ``typing.runtime_checkable``: they test that the members exist, not their types. Members are
class attributes, methods or plain instance attributes (never submodules, which a
static attribute look-up does not see).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # groups.py imports this module
    from lit_prune.core.groups import ChannelGroup

__all__ = [
    "ChannelSamplers",
    "CompactsBlocks",
    "DeclaresChannelGroups",
    "GatedBlock",
    "ResidualBlock",
    "ZooModel",
    "is_zoo_model",
]


@runtime_checkable
class ZooModel(Protocol):
    """A model built by :func:`lit_prune.models.create_model`: its name and arguments rebuild it.

    ``create_model`` sets ``zoo_name`` and ``zoo_kwargs`` on the model it returns; ``arch_kwargs`` (every
    :class:`lit_prune.models.ZooModel` subclass has it) reads the *current* widths back, so
    ``create_model(zoo_name, **{**zoo_kwargs, **arch_kwargs()})`` rebuilds the shapes after surgery. A zoo
    class constructed directly (not through ``create_model``) is not one.
    """

    zoo_name: str
    zoo_kwargs: dict[str, Any]

    def arch_kwargs(self) -> dict[str, Any]:
        """Constructor arguments (``cfg``, ``select``, ...) that rebuild the current shapes."""
        ...


def is_zoo_model(model: object) -> bool:
    """Whether ``model`` was built by ``create_model`` (:class:`ZooModel`), so an artifact can describe it."""
    return isinstance(model, ZooModel)


@runtime_checkable
class DeclaresChannelGroups(Protocol):
    """A model that lists its prunable channel groups itself (the zoo); others are traced."""

    def channel_groups(self) -> list[ChannelGroup]: ...


@runtime_checkable
class ResidualBlock(Protocol):
    """A residual block whose branch ends in one conv: ``out = act(shortcut(x) + a * conv_end(h) + b)``.

    ``a`` and ``b`` (per output channel) are what the branch does to the end conv's output before the
    addition, in eval mode: the BN after it (none in a pre-activation block) times an SSS gate. He et al.'s
    channel pruning reads them to reconstruct ``branch_end`` against a target that also makes up for the
    error the pruned network already carries on the shortcut (docs/paper-settings.md §5.2 step 5).
    :class:`lit_prune.models.base.ResidualBlock` is the zoo's implementation.
    """

    #: attribute name of the conv whose output meets the shortcut
    branch_end: str

    def shortcut_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the block adds to its branch for block input ``x``: (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""
        ...

    def branch_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``, each (C_out,): the branch adds ``a * z + b`` for an end-conv output ``z`` (eval mode)."""
        ...


@runtime_checkable
class GatedBlock(Protocol):
    """A block that can carry an SSS factor (:class:`lit_prune.core.gates.BlockGate`, submodule ``gate``).

    ``gate_folds_into`` names the submodule whose output the gate scales (the branch's last BN, or its last
    conv when no BN follows it); :func:`lit_prune.core.gates.fold_gates_` folds lambda_b into it.
    """

    gate_folds_into: str


@runtime_checkable
class CompactsBlocks(Protocol):
    """A model whose block names must stay contiguous: after surgery removed a branch, ``compact_blocks``
    drops the emptied blocks and renumbers the rest (:func:`lit_prune.core.surgery.compact_blocks`)."""

    def compact_blocks(self) -> None: ...


@runtime_checkable
class ChannelSamplers(Protocol):
    """A model whose residual blocks can read a selection of their input channels (He et al.'s channel
    sampler, ResNet-50-2x), which its architecture description records (``select``) so the pruned model
    rebuilds from data."""

    def add_channel_samplers(self) -> int:
        """Put an all-channel selection in front of every residual branch that has none; returns how many."""
        ...

