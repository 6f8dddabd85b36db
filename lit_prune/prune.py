"""Prune a trained model into an artifact with a one-shot method, outside of training.

    python -m lit_prune.prune --checkpoint runs/large/last.ckpt --config configs/methods/l1_resnet56_b.yaml \\
        --out runs/resnet56_b.pt
    python -m lit_prune.prune --arch resnet34 --weights resnet34-torchvision.pth \\
        --config configs/methods/l1_resnet34_a.yaml --out resnet34_a.pt

``--config`` names the method the way a ``trainer.callbacks`` entry does (``class_path`` and
``init_args``); a full training config is accepted too, and its pruning callback is used.
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

from lit_prune.artifact import FORMAT, build_model, load_artifact, read_weights
from lit_prune.models import create_model

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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no method config at {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if "class_path" in doc:
        return _instantiate(doc)
    entries = (doc.get("trainer") or {}).get("callbacks") or []
    methods = [m for m in (_instantiate(e) for e in entries if isinstance(e, dict)) if hasattr(m, "prune")]
    if len(methods) != 1:
        raise ValueError(f"{path} must describe exactly one pruning callback (class_path + init_args); "
                         f"found {len(methods)}")
    return methods[0]


def load_source(checkpoint: str | None, arch: str | None, weights: str | None, num_classes: int | None) -> nn.Module:
    """The large model: a Lightning checkpoint, an artifact, or a zoo arch with a plain state dict."""
    if checkpoint is not None:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            return build_model(load_artifact(checkpoint))
        if not isinstance(obj, dict) or "state_dict" not in obj or "hyper_parameters" not in obj:
            raise ValueError(f"{checkpoint} is neither a Lightning checkpoint of lit-prune nor an artifact")
        from lit_prune.module import ImageClassifier

        return ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").model
    if arch is None or weights is None:
        raise ValueError("give --checkpoint, or --arch with --weights (a state dict, e.g. torchvision's)")
    model = create_model(arch, **({"num_classes": num_classes} if num_classes else {}))
    try:
        model.load_state_dict(read_weights(weights))
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match {arch}: {err}") from None
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.prune", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Lightning checkpoint (or artifact) of the large model")
    parser.add_argument("--arch", help="zoo model name, with --weights")
    parser.add_argument("--weights", help="plain state dict (torchvision format) for --arch")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--config", required=True, help="YAML naming the method (class_path, init_args)")
    parser.add_argument("--out", required=True, help="artifact path to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        method = load_method(args.config)
        model = load_source(args.checkpoint, args.arch, args.weights, args.num_classes)
        art = method.prune(model.eval(), path=args.out, source=args.checkpoint or args.weights)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    f = art["flops"]
    print(f"wrote {args.out}: {art['architecture']['name']} {f['pruned']['macs']:,} MACs "
          f"(dense {f['dense']['macs']:,}, ratio {f['ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
