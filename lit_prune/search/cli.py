"""``python -m lit_prune.search``: the prune stage of the Section-5 runner variants, writing one artifact.

    python -m lit_prune.search uniform --of runs/x/seed0/p70/prune/pruned.pt \\
        --checkpoint runs/x/seed0/large/checkpoints/last.ckpt --match params \\
        --method-config configs/methods/slimming_vgg19_70.yaml --out uniform.pt
    python -m lit_prune.search random --of .../pruned.pt --checkpoint .../last.ckpt --seed 0 --out random.pt
    python -m lit_prune.search guided --of .../pruned.pt [--of ...] --checkpoint .../last.ckpt --out guided.pt
    python -m lit_prune.search guided --from-dir runs/rethink/slimming_vgg16 --from-variant p70 \\
        --checkpoint runs/vgg19_c100/seed0/large/checkpoints/last.ckpt --out transferred.pt

``--checkpoint`` (or ``--arch`` with ``--weights``) is the model pruned by the method (uniform, random) or the
model whose architecture is guided (guided; ``--target-arch`` builds another zoo model with its classes).
Guided pruning of physically pruned artifacts averages their stage-wise kept ratios; of masked artifacts it
transfers their per-stage, per-kernel-position sparsity (guided sparsification).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# torch is imported once the arguments parse: --help stays cheap

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.search", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="Lightning checkpoint (or artifact) of the model")
        p.add_argument("--arch", help="zoo model name, with --weights")
        p.add_argument("--weights", help="plain state dict for --arch")
        p.add_argument("--num-classes", type=int)
        p.add_argument("--seed", type=int, default=0, help="seed of the random choices (random, guided sparsity)")
        p.add_argument("--out", required=True, help="artifact path to write")

    u = sub.add_parser("uniform", help="the uniformly pruned model with the artifact's params or FLOPs")
    u.add_argument("--of", required=True, help="the method's artifact")
    u.add_argument("--match", choices=("params", "flops"), default="params")
    u.add_argument("--method-config", help="the method's config: the groups its width plan prunes, its skip list")
    u.add_argument("--method-args", help="JSON overrides of the method config's init_args")
    common(u)
    r = sub.add_parser("random", help="the method's widths with randomly chosen channels (weights)")
    r.add_argument("--of", required=True, help="the method's artifact")
    common(r)
    g = sub.add_parser("guided", help="the stage-wise pattern of pruned artifacts applied to a model")
    g.add_argument("--of", action="append", default=[], help="a pruned artifact (repeat to average several)")
    g.add_argument("--from-dir", help="another experiment's directory: every seed's artifact of --from-variant")
    g.add_argument("--from-variant")
    g.add_argument("--target-arch", help="guide this zoo model (with --checkpoint's classes) instead")
    common(g)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lit_prune.artifact import save_artifact

    try:
        art, line = _run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if err.args and not isinstance(err, OSError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    save_artifact(art, args.out)
    f = art.flops
    print(f"wrote {args.out}: {art.architecture.name} {f.pruned.macs:,} MACs, {f.pruned.params:,} params "
          f"(dense {f.dense.macs:,} MACs, ratio {f.ratio:.3f}){line}")
    return 0


def _large(args: argparse.Namespace):
    from lit_prune.sources import load_source

    if args.checkpoint is None and args.arch is None:
        raise ValueError("give --checkpoint (the model), or --arch with --weights")
    model, _ = load_source(args.checkpoint, args.arch, args.weights, args.num_classes)
    return model.eval()


def _run(args: argparse.Namespace):
    from lit_prune.artifact import load_artifact

    if args.command == "uniform":
        from lit_prune.search.uniform import uniform_baseline
        from lit_prune.sources import load_method

        method = None
        if args.method_config:
            method = load_method(args.method_config, json.loads(args.method_args) if args.method_args else None)
        found = uniform_baseline(_large(args), load_artifact(args.of), args.match, method)
        what = "sparsity" if found.artifact.masks else "width multiplier"
        return found.artifact, f"; {what} {found.value:.4f}, {args.match} {found.reached:,} for {found.target:,}"
    if args.command == "random":
        from lit_prune.search.random_control import random_control

        return random_control(_large(args), load_artifact(args.of), args.seed), f"; seed {args.seed}"
    return _guided(args)


def _guided(args: argparse.Namespace):
    import torch

    from lit_prune.artifact import build_model, load_artifact
    from lit_prune.models import architecture, create_model
    from lit_prune.protocol.layout import RunLayout
    from lit_prune.search.guided import guided_from
    from lit_prune.search.uniform import shapes_device

    if bool(args.of) == bool(args.from_dir):
        raise ValueError("give --of ARTIFACT (repeatable) or --from-dir DIR with --from-variant NAME")
    large = _large(args)
    paths = [Path(p) for p in args.of]
    if args.from_dir:
        if not args.from_variant:
            raise ValueError("--from-dir needs --from-variant (the variant whose artifacts guide)")
        paths = RunLayout(args.from_dir).artifacts(args.from_variant)
    pairs = []
    for path in paths:
        art = load_artifact(path)
        dense_path = RunLayout.large_model_of(path)
        if dense_path is not None and dense_path.is_file():
            large_art = load_artifact(dense_path)
            with torch.device(shapes_device(lambda a=large_art: build_model(a, weights=False))):
                dense = build_model(large_art, weights=False)
        elif not args.from_dir:  # this experiment's artifact: pruned from the given model
            dense = large
        else:
            raise FileNotFoundError(f"no large model beside {path} (looked for {dense_path})")
        pairs.append((art, dense))
    target = large
    if args.target_arch:
        classes = architecture(large)["kwargs"].get("num_classes")
        target = create_model(args.target_arch, **({"num_classes": classes} if classes else {}))
    art = guided_from(pairs, target, args.seed, [str(p) for p in paths])
    ratios = art.provenance.settings.get("stage_ratios")
    return art, f"; stage ratios {[round(r, 3) for r in ratios]}" if ratios else "; guided sparsification"
