"""Print the multiply-accumulates and parameters of a zoo model, layer by layer.

    python -m lit_prune.flops cifar_vgg16 --width-config A
    python -m lit_prune.flops cifar_resnet56 --width-config '[6, 6, ...]' --json
    python -m lit_prune.flops runs/pruned.pt          # a pruned artifact
    python -m lit_prune.flops runs/pruned.pt --scratch-b 160   # + its Scratch-B epochs and LR milestones
    python -m lit_prune.flops runs/large/last.ckpt    # the model of a Lightning checkpoint of train.py
    python -m lit_prune.flops cifar_vgg19 --convention reference  # the reference code's FLOPs (BN, ReLU, pools)
    python -m lit_prune.flops --list

The counting convention is documented in :mod:`lit_prune.core.flops`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lit_prune.core.budget import RULES, scratch_b_budget

# The counter, the zoo and artifacts (torch) are imported in main(), once the arguments parse: --help stays cheap.


def _parse_cfg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a registered name such as "A"


def _table(name: str, report: Any) -> str:
    rows = [f"{'layer':<40} {'type':<8} {'output':<16} {'MACs':>15} {'params':>12}"]
    for e in report.layers:
        shape = "x".join(map(str, e.output_shape))
        rows.append(f"{e.name:<40} {e.type:<8} {shape:<16} {e.macs:>15,} {e.params:>12,}")
    rows.append("-" * len(rows[0]))
    size = "x".join(map(str, report.input_size))
    rows.append(f"{name}: {report.macs:,} MACs ({report.macs:.3e}), {report.params:,} parameters, input {size}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.flops", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?",
                        help="registered model name, or the path of a pruned artifact or of a Lightning checkpoint")
    parser.add_argument("--width-config", "--cfg", dest="cfg", help="a registered width-config name or JSON")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    parser.add_argument("--nonzero", action="store_true", help="count only non-zero conv/linear weights")
    parser.add_argument("--convention", choices=("macs", "reference"), default="macs",
                        help="macs: conv + linear multiply-accumulates (the paper's tables); reference: also BN, "
                             "ReLU and pools as the paper's code counts them (its Scratch-B budgets, §1.4)")
    parser.add_argument("--large-width-config", dest="large_cfg", metavar="CFG",
                        help="with --convention reference on an artifact: the large model's width config, when "
                             "it was not the unpruned one (the artifact records only its MACs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list registered models and width configs")
    budget = parser.add_argument_group("Scratch-B budget of an artifact (docs/paper-settings.md §1.3)")
    budget.add_argument("--scratch-b", type=int, metavar="EPOCHS", help="the large model's epochs (160 on CIFAR)")
    budget.add_argument("--rule", choices=RULES, default="fractions",
                        help="milestones: fractions (CIFAR), thirds (ImageNet), scale (SFP), multiples (SSS)")
    budget.add_argument("--cap", type=float, help="largest stretch (the paper's 2.0 on ImageNet)")
    budget.add_argument("--base-milestones", type=int, nargs="+", metavar="E",
                        help="the large model's LR milestones (rules scale and multiples)")
    args = parser.parse_args(argv)
    from lit_prune.artifact import Artifact, build_model
    from lit_prune.core.flops import count_flops, macs_ratio
    from lit_prune.models import create_model, list_models, list_width_configs
    from lit_prune.sources import _read_checkpoint, load_source

    if args.list:
        configs = list_width_configs()
        for name in list_models():
            named = configs.get(name)
            print(f"{name}" + (f"  (width configs: {', '.join(named)})" if named else ""))
        return 0
    if not args.model:
        parser.error("give a model name (see --list)")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    extra: dict[str, Any] = {"model": args.model, "cfg": _parse_cfg(args.cfg)}
    try:
        if Path(args.model).is_dir():
            raise ValueError(f"{args.model} is a directory; give a pruned artifact, a checkpoint or a model name")
        obj = _read_checkpoint(args.model) if Path(args.model).is_file() else None
        if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:  # a Lightning checkpoint
            model, _ = load_source(args.model, None, None, None)
            extra = {"model": args.model, "cfg": getattr(model, "cfg", None)}
        elif obj is not None:  # a pruned artifact: count its non-zero weights, show the dense size
            art = Artifact.from_dict(obj, where=args.model)
            model = build_model(art)
            args.nonzero = args.nonzero or bool(art.masks)
            extra = {"model": art.architecture.name, "cfg": art.architecture.kwargs.get("cfg"),
                     "dense": art.flops.dense.to_dict(), "method": art.provenance.method}
        else:
            model = create_model(args.model, cfg=_parse_cfg(args.cfg), **kwargs)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if args.scratch_b is not None and "dense" not in extra:
        parser.error("--scratch-b needs a pruned artifact (its unpruned FLOPs give the ratio r)")
    if args.scratch_b is not None and args.input_size:
        parser.error("--scratch-b uses the artifact's unpruned FLOPs, counted at the model's own input size: "
                     "drop --input-size")
    report = count_flops(model, tuple(args.input_size) if args.input_size else None, nonzero=args.nonzero,
                         convention=args.convention)
    ratio = None
    if "dense" in extra and args.convention == "reference":  # the large model rebuilt, counted the same way
        from lit_prune.protocol.plan import _NoReference, reference_ratio

        try:
            ratio = reference_ratio(art, _parse_cfg(args.large_cfg))
        except _NoReference as err:
            print(f"error: no reference-convention ratio for {args.model}: {err}; give the large model's widths "
                  "with --large-width-config", file=sys.stderr)
            return 2
    elif "dense" in extra:
        ratio = macs_ratio(extra["dense"]["macs"], report.macs)
    if args.scratch_b is not None:
        try:
            extra["scratch_b"] = scratch_b_budget(args.scratch_b, ratio, rule=args.rule, cap=args.cap,
                                                  base_milestones=args.base_milestones).to_dict()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({**extra, **report.to_dict()}))
    else:
        print(_table(extra["model"], report))
        if "dense" in extra:
            d = extra["dense"]
            print(f"unpruned: {d['macs']:,} MACs, {d['params']:,} parameters; "
                  f"FLOPs ratio {ratio:.3f} ({args.convention} convention; {extra['method']})")
        if "scratch_b" in extra:
            b = extra["scratch_b"]
            print(f"Scratch-B: {b['epochs']} epochs (x{b['factor']:.3f} of {args.scratch_b}), LR milestones "
                  f"{b['milestones']}; train.py fit ... --model.artifact {args.model} --model.regime scratch "
                  f"--trainer.max_epochs {b['epochs']} --model.schedule multistep "
                  f"--model.milestones '{json.dumps(b['milestones'])}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
