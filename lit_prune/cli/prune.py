"""Prune a trained model into an artifact with a one-shot method, outside of training.

    python -m lit_prune.prune --checkpoint runs/large/last.ckpt --config configs/methods/l1_resnet56_b.yaml \\
        --out runs/resnet56_b.pt
    python -m lit_prune.prune --arch resnet34 --weights resnet34-torchvision.pth \\
        --config configs/methods/l1_resnet34_a.yaml --out resnet34_a.pt
    python -m lit_prune.prune --arch timm:efficientnet_b0 --weights w.pth --config l1.yaml --out effnet.pt

``--arch`` is a zoo name, or a torchvision or timm model (``torchvision:resnet50``, ``timm:efficientnet_b0``:
built with random weights, never downloaded, then ``--weights`` loaded into it). FLOPs are counted at
``--input-size``, else the ``--data-config`` datamodule's, else the model's own (224x224 for torchvision's
ImageNet models, timm's ``pretrained_cfg``).

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
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lit_prune.artifact import Artifact

# The library (torch, and Lightning for the methods) is imported once the arguments parse: --help stays cheap.

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.prune", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Lightning checkpoint (or artifact) of the large model")
    parser.add_argument("--arch", help="zoo model name (with --weights or --width-config), or torchvision:<name> / "
                        "timm:<name> (with --weights)")
    parser.add_argument("--weights", help="plain state dict (torchvision format) for --arch")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--config", help="YAML naming the method (class_path, init_args)")
    parser.add_argument("--method-args", type=_json_mapping, help="JSON overrides of the method's init_args, e.g. "
                        "'{\"prune_ratio\": 0.5}' (the runner passes a variant's method_args)")
    parser.add_argument("--width-config", help="named width config of --arch: write it as an architecture-only "
                        "artifact (fresh init, for Scratch-E/B), instead of pruning with --config")
    parser.add_argument("--data-config", help="YAML naming the datamodule (class_path, init_args; or a training "
                        "config with data:) whose training images data-driven methods (ThiNet, channel pruning) use")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="count FLOPs at this input size (default: the --data-config datamodule's, else the "
                        "model's own)")
    parser.add_argument("--out", required=True, help="artifact path to write")
    parser.add_argument("--log-dir", help="write the pruning's TensorBoard run here (FLOPs and parameters before "
                        "and after, per-layer widths or sparsity); the runner uses <out>/tb/seed<N>/<variant>/prune")
    args = parser.parse_args(argv)
    from lit_prune.artifact import save_artifact
    from lit_prune.sources import predefined_artifact
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
        # str() of an OSError is "[Errno 2] ...: 'path'"; its args[0] would be the bare errno
        message = err.args[0] if err.args and not isinstance(err, OSError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    f = art.flops
    print(f"wrote {args.out}: {art.architecture.name} {f.pruned.macs:,} MACs "
          f"(dense {f.dense.macs:,}, ratio {f.ratio:.3f})")
    return 0


def _json_mapping(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of init_args is needed, got {text}")
    return value


def _prune(args: argparse.Namespace) -> Artifact:
    """Prune the large model named by ``args`` with the method of ``args.config``; returns the artifact."""
    from lit_prune.sources import load_datamodule, load_method, load_source

    method = load_method(args.config, args.method_args)
    if method.needs_data and args.data_config is None:
        raise ValueError(f"{type(method).__name__} samples training images: give --data-config naming the "
                         "datamodule (a training config works)")
    model, init_state = load_source(args.checkpoint, args.arch, args.weights, args.num_classes)
    dataloader, size = None, tuple(args.input_size) if args.input_size else None
    if method.needs_data:
        datamodule = load_datamodule(args.data_config)
        dataloader, size = datamodule.train_dataloader(), size or getattr(datamodule, "input_size", None)
    elif args.data_config is not None:
        log.info("%s uses no data: --data-config is ignored", type(method).__name__)
    trainer = _logging_trainer(args.log_dir) if args.log_dir else None
    # an absolute path: with a trainer, a relative one would be resolved against its log directory
    return method.prune(model.eval(), trainer=trainer, path=str(Path(args.out).resolve()),
                        source=args.checkpoint or args.weights, init_state=init_state, dataloader=dataloader,
                        input_size=size)


def _logging_trainer(log_dir: str):
    """A one-process Trainer whose only job is to carry a TensorBoard logger writing into ``log_dir``."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    where = Path(log_dir)
    logger = TensorBoardLogger(save_dir=str(where.parent), name="", version=where.name, default_hp_metric=False)
    return pl.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)

