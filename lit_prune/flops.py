"""Print the multiply-accumulates and parameters of a zoo model, layer by layer.

    python -m lit_prune.flops cifar_vgg16 --width-config A
    python -m lit_prune.flops cifar_resnet56 --width-config '[6, 6, ...]' --json
    python -m lit_prune.flops --list

The counting convention is documented in :mod:`lit_prune.core.flops`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lit_prune.core.flops import FlopsReport, count_flops
from lit_prune.models import create_model, list_models, list_width_configs


def _parse_cfg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a registered name such as "A"


def _table(name: str, report: FlopsReport) -> str:
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
    parser.add_argument("model", nargs="?", help="registered model name")
    parser.add_argument("--width-config", "--cfg", dest="cfg", help="a registered width-config name or JSON")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    parser.add_argument("--nonzero", action="store_true", help="count only non-zero conv/linear weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list registered models and width configs")
    args = parser.parse_args(argv)

    if args.list:
        configs = list_width_configs()
        for name in list_models():
            named = configs.get(name)
            print(f"{name}" + (f"  (width configs: {', '.join(named)})" if named else ""))
        return 0
    if not args.model:
        parser.error("give a model name (see --list)")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    try:
        model = create_model(args.model, cfg=_parse_cfg(args.cfg), **kwargs)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    report = count_flops(model, tuple(args.input_size) if args.input_size else None, nonzero=args.nonzero)
    if args.json:
        print(json.dumps({"model": args.model, "cfg": _parse_cfg(args.cfg), **report.to_dict()}))
    else:
        print(_table(args.model, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
