"""Wall time of a whole protocol run with stages side by side (``--jobs 2``) against one after the other
(``--jobs 1``).

    python benchmarks/runner_jobs.py                                   # the quickstart, 2 rounds (~25 min on 2 cores)
    python benchmarks/runner_jobs.py --rounds 1 --arg=--trainer.limit_train_batches=20 --json   # reduced

Each run is ``python -m lit_prune.rethink --config <experiment> --out <fresh temporary directory> --jobs N``
from the repository root, as a user starts it: every stage a process of its own (start-up, data loading,
training, test, artifact), the report at the end. ``--arg`` appends train.py arguments to the experiment's
``args`` (a reduced run: fewer batches or epochs; say so when quoting the figure), written to a temporary
copy of the experiment config.

The sides are interleaved (jobs1 jobs2, jobs2 jobs1, ...; ``_common.alternate``), one run per side per round;
per round the ratio is wall(--jobs 1) / wall(--jobs 2), the speed-up of running side by side, printed as the
median over the rounds with its spread, with each side's median wall time and the load average before and
after. With ``--jobs 2`` each stage gets ``cores // 2`` threads (the runner's rule); ``--jobs 1`` leaves
torch's default. Goal (issue 12): >= 1.4x on the quickstart on a 2-core machine. A goal, not a gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, alternate, load_average, spread, summarize  # also puts the repository on sys.path


def experiment_copy(config: Path, extra_args: list[str], folder: Path) -> Path:
    """The experiment config with ``extra_args`` appended to its ``args`` (the config itself if none)."""
    if not extra_args:
        return config
    doc = yaml.safe_load(config.read_text())
    doc["args"] = [*(doc.get("args") or []), *extra_args]
    copy = folder / config.name
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    return copy


class Side:
    """One side: the runner with ``--jobs jobs``, each call a fresh experiment directory."""

    def __init__(self, jobs: int, config: Path, folder: Path, python: str) -> None:
        self.jobs, self.config, self.folder, self.python = jobs, config, folder, python
        self.runs = 0
        self.acc: list[dict[str, Any]] = []

    def __call__(self) -> None:
        self.runs += 1
        out = self.folder / f"jobs{self.jobs}_run{self.runs}"
        cmd = [self.python, "-m", "lit_prune.rethink", "--config", str(self.config), "--out", str(out),
               "--jobs", str(self.jobs)]
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
        results = json.loads((out / "results.json").read_text())
        self.acc.append({v: {row: r["acc1"] for row, r in d["rows"].items()} for v, d in results["variants"].items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/experiments/quickstart.yaml", help="experiment config")
    parser.add_argument("--arg", action="append", default=[], metavar="ARG",
                        help="a train.py argument appended to the experiment's args (repeatable), e.g. "
                        "--arg=--trainer.limit_train_batches=20")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="discarded leading rounds")
    parser.add_argument("--jobs", type=int, default=2, help="the side-by-side side's --jobs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    args = parser.parse_args(argv)
    config = (ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="runner_jobs_") as tmp:
        folder = Path(tmp)
        exp = experiment_copy(config, args.arg, folder)
        sides = {"jobs1": Side(1, exp, folder, sys.executable), f"jobs{args.jobs}": Side(args.jobs, exp, folder,
                                                                                        sys.executable)}
        t0 = time.perf_counter()
        times = alternate(sides, args.rounds, warmup=args.warmup)
        total = time.perf_counter() - t0
    names = list(sides)
    ratios = [a / b for a, b in zip(times[names[0]], times[names[1]], strict=True)]
    same = all(a == b for a, b in zip(sides[names[0]].acc, sides[names[1]].acc, strict=False))
    result = {"config": str(args.config), "extra_args": args.arg, "rounds": args.rounds, "warmup": args.warmup,
              "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "wall_s": times,
              "speedup": summarize(ratios), "same_accuracies": same, "total_s": total,
              "load_before": load_before, "load_after": load_average()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.config}{' with ' + ' '.join(args.arg) if args.arg else ''}: {args.rounds} rounds "
          f"(+{args.warmup} warm-up), {result['cores']} cores, OMP_NUM_THREADS={result['omp_num_threads']}")
    for r, (a, b) in enumerate(zip(times[names[0]], times[names[1]], strict=True)):
        print(f"  round {r}: --jobs 1 {a:.1f} s, --jobs {args.jobs} {b:.1f} s, ratio {a / b:.3f}")
    print(f"speed-up wall(--jobs 1) / wall(--jobs {args.jobs}): {spread(result['speedup'], 3)}")
    print(f"same final accuracies on both sides: {same}")
    print(f"load average before {load_before}, after {result['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
