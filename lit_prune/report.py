"""``python -m lit_prune.report RUNS... [--format md,csv,tex] [--out DIR]``: finished experiment directories in the
paper's table layout (mean ± std over seeds, the paper's number beside ours, Welch's t-test of Scratch-B against
fine-tuning and of every Section-5 control against its method) and the parameter-efficiency plots.

    python -m lit_prune.report runs/rethink/quickstart_search --out runs/report/quickstart_search
    python -m lit_prune.report runs/rethink/l1_vgg16 runs/rethink/l1_resnet56 --format md,tex

The implementation is :mod:`lit_prune.protocol.compare`; it reads what every stage logged to TensorBoard (its
hyper-parameters and final accuracy), so the report and TensorBoard's HParams tab agree. The t-test needs scipy
(``pip install -e '.[report]'``).
"""

from __future__ import annotations

import argparse
import sys

# the library (TensorBoard's event reader, matplotlib, scipy) is imported once the arguments parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.report", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="experiment directories (the --out of python -m lit_prune.rethink)")
    parser.add_argument("--format", default="md,csv,tex", help="comma-separated: md, csv, tex (default: all)")
    parser.add_argument("--out", default="runs/report", help="where report.<fmt> and efficiency.png go")
    parser.add_argument("--no-plot", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    from lit_prune.protocol.compare import write_report

    try:
        written = write_report(args.runs, args.out, [f.strip() for f in args.format.split(",") if f.strip()],
                               plot=not args.no_plot)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "md" in written:
        print(written["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
