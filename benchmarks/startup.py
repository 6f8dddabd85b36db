"""Start-up cost of the command-line tools, against ``python -c 'import pytorch_lightning.cli'``.

    python benchmarks/startup.py                  # 5 rounds
    python benchmarks/startup.py --rounds 3 --json

Every protocol stage is a new process (``python -m lit_prune.stage ...``), so on small stages its start-up
is most of its time. Each command runs as a child process; its CPU time (user + sys, from ``os.wait4``) and
wall time are taken per round, the commands interleaved (the order rotated every round, after a discarded
warm-up round), and each command's CPU time is divided by that of the baseline in the same round:

- ``import``: ``python -c "import pytorch_lightning.cli"``, the floor of any command that trains;
- ``stage``: a stage that only tests a pruned model (the protocol's "pruned, no retraining" stage) on the
  offline MNIST data (``configs/quickstart.yaml``, which needs the ``quickstart`` extra), one test batch,
  so that what remains is start-up: imports, config parsing, building the model from its artifact, the
  Trainer, and writing the metrics and the model;
- ``fit --help``: ``python train.py fit --help`` (goal: at most 1.5x the baseline's CPU);
- ``<tool> --help`` for rethink, stage, prune and flops: these print without importing torch, so their
  ratio is far below 1.

Printed: per command, the median CPU ratio to the baseline with its min, max and IQR over the rounds,
and the median CPU and wall seconds. Goals, not gates: never assert timings in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, load_average, spread, summarize

BASELINE = "import"


def run_child(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``cmd`` to its end; return its (CPU seconds, wall seconds). Fails loudly if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return usage.ru_utime + usage.ru_stime, wall


def commands(work: Path) -> dict[str, list[str]]:
    py = sys.executable
    artifact = work / "pruned.pt"
    stage_dir = work / "stage"
    stage = [py, "-m", "lit_prune.stage", f"--stage_dir={stage_dir}", "--config=configs/quickstart.yaml",
             "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=0",
             "--trainer.limit_test_batches=1", f"--model.artifact={artifact}", "--model.regime=finetune"]
    return {
        BASELINE: [py, "-c", "import pytorch_lightning.cli"],
        "stage": stage,
        "fit --help": [py, "train.py", "fit", "--help"],
        **{f"{tool} --help": [py, "-m", f"lit_prune.{tool}", "--help"]
           for tool in ("rethink", "stage", "prune", "flops")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # the artifact the stage tests: the narrow VGG-11 of the quickstart, pruned to half its widths
        from lit_prune.artifact import make_artifact, save_artifact
        from lit_prune.methods.state import Counts
        from lit_prune.models import create_model

        large = create_model("cifar_vgg11", cfg=[16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128])
        pruned = create_model("cifar_vgg11", cfg=[8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64])
        save_artifact(make_artifact(pruned, method="benchmark", dense=Counts.of(large)), work / "pruned.pt")
        cmds = commands(work)
        stage_dir = work / "stage"
        names = list(cmds)
        cpu: dict[str, list[float]] = {n: [] for n in names}
        wall: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds + 1):  # round 0 warms the file cache and is discarded
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name == "stage":  # a done stage would return at once: start it afresh every time
                    for f in ("metrics.json", "model.pt"):
                        (stage_dir / f).unlink(missing_ok=True)
                c, w = run_child(cmds[name], ROOT)
                if r:
                    cpu[name].append(c)
                    wall[name].append(w)
            if r and not args.json:
                print(f"round {r}: " + ", ".join(f"{n} {cpu[n][-1]:.2f}s" for n in names), flush=True)
    result = {
        "rounds": args.rounds, "load_average": load_average(),
        "commands": {n: {"cpu_s": statistics.median(cpu[n]), "wall_s": statistics.median(wall[n]),
                         "cpu_ratio": summarize([a / b for a, b in zip(cpu[n], cpu[BASELINE])])}
                     for n in names},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\nCPU time of each command / CPU time of `{' '.join(cmds[BASELINE][1:])}` in the same round "
          f"({args.rounds} rounds, load average {result['load_average']}):")
    for n, r in result["commands"].items():
        print(f"  {n:<16} cpu {r['cpu_s']:6.2f}s  wall {r['wall_s']:6.2f}s  ratio {spread(r['cpu_ratio'], 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
