"""Prune a trained model into an artifact with a one-shot method, outside of training.

    python -m lit_prune.prune --checkpoint runs/large/last.ckpt --config configs/methods/l1_resnet56_b.yaml \\
        --out runs/resnet56_b.pt
    python -m lit_prune.prune --arch resnet34 --weights resnet34-torchvision.pth \\
        --config configs/methods/l1_resnet34_a.yaml --out resnet34_a.pt

``--config`` names the method the way a ``trainer.callbacks`` entry does (``class_path`` and
``init_args``); a full training config is accepted too, and its pruning callback is used.

Data-driven methods (ThiNet, He et al.'s channel pruning: ``needs_data = True``) sample training images:
``--data-config`` names the datamodule as a training config's ``data:`` section does (``class_path`` and
``init_args``), or is a training config itself; its ``train_dataloader()`` is passed to the method::

    python -m lit_prune.prune --checkpoint runs/vgg16/last.ckpt --config thinet.yaml \\
        --data-config configs/imagenet/vgg16.yaml --out thinet_conv.pt

The paper's predefined pruned architectures (ThiNet, VGG-16-5x, ResNet-50-2x, SSS ResNet-26/32/41, L1's
ResNet-34-A/B, ...) are named width configs of the zoo; ``--width-config`` writes one as an
*architecture-only* artifact, freshly initialised, so that Scratch-E/B run through the same artifact path
(``--model.artifact thinet70.pt --model.regime scratch``)::

    python -m lit_prune.prune --arch resnet50 --width-config thinet70 --out thinet70.pt

Its dense FLOPs are those of ``--arch`` with its default (unpruned) widths, so Scratch-B stretches by the
paper's ratio. Its weights are a fresh initialisation: nothing was inherited from a trained model.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lit_prune.artifact import FORMAT, build_model, load_artifact, make_artifact, read_weights, save_artifact
from lit_prune.core.flops import count_flops
from lit_prune.methods.state import checkpoint_states
from lit_prune.models import create_model, get_width_config_kwargs

log = logging.getLogger(__name__)


def _instantiate(entry: dict[str, Any]) -> Any:
    class_path = entry.get("class_path")
    if not class_path or "." not in class_path:
        raise ValueError(f"method entry needs a class_path such as callbacks.L1FilterPruning, got {entry!r}")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {class_path!r}: {err}") from None
    return cls(**(entry.get("init_args") or {}))


def load_method(path: str | Path) -> Any:
    """The pruning callback described by a YAML file (an entry, or a config with trainer.callbacks)."""
    from lit_prune.callbacks.base import PruningCallback  # Lightning: imported only when a method is loaded

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no method config at {path}")
    doc = yaml.safe_load(path.read_text()) or {}
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


def load_source(
    checkpoint: str | None, arch: str | None, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The large model (a Lightning checkpoint, an artifact, or a zoo arch with a plain state dict) and the
    theta_0 it carries, if any (a lottery-ticket run's callback state, or an artifact's ``init_state``)."""
    if checkpoint is not None:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            art = load_artifact(checkpoint)
            return build_model(art), art.get("init_state")
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
        raise ValueError(f"{weights} does not match {arch}: {err}") from None
    return model, None


def predefined_artifact(arch: str, width_config: str, num_classes: int | None = None) -> dict[str, Any]:
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
    dense = count_flops(create_model(arch, **extra))
    model = create_model(arch, cfg=width_config, **extra)
    settings = {"arch": arch, "width_config": width_config, "weights": "fresh initialisation, none inherited"}
    return make_artifact(model, method="predefined", settings=settings, source=None,
                         dense={"macs": dense.macs, "params": dense.params})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.prune", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Lightning checkpoint (or artifact) of the large model")
    parser.add_argument("--arch", help="zoo model name, with --weights or --width-config")
    parser.add_argument("--weights", help="plain state dict (torchvision format) for --arch")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--config", help="YAML naming the method (class_path, init_args)")
    parser.add_argument("--width-config", help="named width config of --arch: write it as an architecture-only "
                        "artifact (fresh init, for Scratch-E/B), instead of pruning with --config")
    parser.add_argument("--data-config", help="YAML naming the datamodule (class_path, init_args; or a training "
                        "config with data:) whose training images data-driven methods (ThiNet, channel pruning) use")
    parser.add_argument("--out", required=True, help="artifact path to write")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.width_config is None):
        parser.error("give exactly one of --config (prune a trained model) and --width-config (a predefined "
                     "architecture, with --arch)")
    if args.width_config is not None and (args.arch is None or args.checkpoint or args.weights):
        parser.error("--width-config needs --arch and no --checkpoint/--weights: a predefined architecture "
                     "inherits no weights")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.width_config is not None:
            art = predefined_artifact(args.arch, args.width_config, args.num_classes)
            save_artifact(art, args.out)
        else:
            art = _prune(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    f = art["flops"]
    print(f"wrote {args.out}: {art['architecture']['name']} {f['pruned']['macs']:,} MACs "
          f"(dense {f['dense']['macs']:,}, ratio {f['ratio']:.3f})")
    return 0


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    """Prune the large model named by ``args`` with the method of ``args.config``; returns the artifact."""
    method = load_method(args.config)
    if method.needs_data and args.data_config is None:
        raise ValueError(f"{type(method).__name__} samples training images: give --data-config naming the "
                         "datamodule (a training config works)")
    model, init_state = load_source(args.checkpoint, args.arch, args.weights, args.num_classes)
    dataloader = None
    if method.needs_data:
        dataloader = load_datamodule(args.data_config).train_dataloader()
    elif args.data_config is not None:
        log.info("%s uses no data: --data-config is ignored", type(method).__name__)
    return method.prune(model.eval(), path=args.out, source=args.checkpoint or args.weights, init_state=init_state,
                        dataloader=dataloader)


if __name__ == "__main__":
    sys.exit(main())
