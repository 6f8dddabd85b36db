"""``python -m lit_prune.rethink``: run (or, with ``--dry-run``, print) every stage of an experiment.

    python -m lit_prune.rethink --config configs/experiments/quickstart.yaml
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --out runs/r56 --dry-run
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --devices 0,1,2,3 --jobs-per-device 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_prune.protocol import config as config_module
from lit_prune.protocol.config import ExperimentError, load_experiment
from lit_prune.protocol.executor import Slots
from lit_prune.protocol.run import Protocol

DESCRIPTION = "The protocol runner: one command runs a whole experiment of the paper."
_REPO = Path(__file__).resolve().parents[2]


def shipped_experiments() -> list[str]:
    """The experiment configs in configs/experiments/ (of the working directory, else of the source tree)."""
    for root in (Path.cwd(), _REPO):
        found = sorted((root / "configs" / "experiments").glob("*.yaml"))
        if found:
            return [str(p.relative_to(root)) for p in found]
    return []


def _epilog() -> str:
    doc = (config_module.__doc__ or "").split("\n", 1)[1]
    shipped = shipped_experiments()
    listing = "\n".join(f"  {p}" for p in shipped) if shipped else "  (none found)"
    return f"{doc.rstrip().replace('(YAML)::', '(YAML):')}\n\nshipped experiments:\n{listing}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.rethink",
                                     description=DESCRIPTION,
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--out", help="experiment directory (default: the config's 'out', or runs/rethink/NAME)")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's command and epochs, run nothing")
    parser.add_argument("--verbose", action="store_true", help="stream every stage's output instead of logging it")
    side = parser.add_argument_group("stages side by side (lit_prune/protocol/executor.py)")
    side.add_argument("--jobs", type=int, metavar="N",
                      help="run up to N independent stages at once (seeds' chains, the regimes of one artifact); "
                      "default 1, or every device slot with --devices; each job gets cores // N threads")
    side.add_argument("--devices", metavar="0,1,...",
                      help="pin each job to one of these devices (CUDA_VISIBLE_DEVICES); one device per stage")
    side.add_argument("--jobs-per-device", type=int, metavar="K", help="jobs sharing each device (default 1)")
    args = parser.parse_args(argv)
    try:
        slots = Slots.plan(args.jobs, args.devices, args.jobs_per_device)
        config = load_experiment(args.config)
        out = Path(args.out or config.out or Path("runs") / "rethink" / config.name)
        Protocol(config, out).run(dry_run=args.dry_run, verbose=args.verbose, slots=slots)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
