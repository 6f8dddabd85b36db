"""Running the network up to a layer: the inputs of submodules, captured by forward pre-hooks.

The forward pass stops (an exception raised by the hook) once every requested input has been seen, so the
layers after them cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def input_of(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``path`` when ``model`` runs on ``x`` (the forward stops there)."""
    return inputs_of(model, (path,), x)[0]


def inputs_of(model: nn.Module, paths: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of several submodules in one forward pass, which stops once all of them have been seen."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.setdefault(path, args[0])
            if len(captured) == len(paths):
                raise _Stop

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in paths]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in captured]
    if missing:
        raise RuntimeError(f"{missing[0]} was not called in the forward pass of {type(model).__name__}")
    return [captured[p] for p in paths]


def images_of(batch: Any, device: torch.device) -> torch.Tensor:
    """The input tensor of a batch (a tensor, or the first element of an (inputs, targets) pair)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batches must be tensors or (inputs, targets) pairs, got {type(batch).__name__}")
    return batch.to(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
