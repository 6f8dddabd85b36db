"""``python -m lit_prune.rethink``: run (or, with ``--dry-run``, print) every stage of an experiment.

    python -m lit_prune.rethink --config configs/experiments/quickstart.yaml
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --out runs/r56 --dry-run
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --devices 0,1,2,3 --jobs-per-device 4
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --executor slurm --slurm-partition gpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_prune.protocol import config as config_module
from lit_prune.protocol.config import ExperimentError, load_experiments
from lit_prune.protocol.executor import Slots
from lit_prune.protocol.run import Protocol
from lit_prune.protocol.slurm import DEFAULT_TIME, ClusterOptions

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
    parser.add_argument("--select", action="append", default=[], metavar="AXIS=VALUE",
                        help="of a sweep file's experiments, run those with this value (repeatable); default: all")
    side = parser.add_argument_group("stages side by side (lit_prune/protocol/executor.py)")
    side.add_argument("--jobs", type=int, metavar="N",
                      help="run up to N independent stages at once (seeds' chains, the regimes of one artifact); "
                      "default 1, or every device slot with --devices; each job gets cores // N threads")
    side.add_argument("--devices", metavar="0,1,...",
                      help="pin each job to one of these devices (CUDA_VISIBLE_DEVICES); one device per stage")
    side.add_argument("--jobs-per-device", type=int, metavar="K", help="jobs sharing each device (default 1)")
    jobs = parser.add_argument_group("stages as cluster jobs (lit_prune/protocol/slurm.py; needs submitit)")
    jobs.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                      help="local: this runner's own processes (default); slurm: one Slurm job per stage, with "
                      "afterok dependencies; submitit-local: the same jobs as local processes (a trial run)")
    jobs.add_argument("--slurm-partition", help="the jobs' partition")
    jobs.add_argument("--slurm-time", type=int, metavar="MIN", default=DEFAULT_TIME,
                      help=f"the jobs' time limit in minutes (default {DEFAULT_TIME})")
    jobs.add_argument("--slurm-account", help="the account the jobs are charged to")
    jobs.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                      help="any other submitit Slurm parameter (qos=high, constraint=a100, cpus_per_task=8, "
                      "mem_gb=64, ...); repeatable")
    jobs.add_argument("--no-wait", action="store_true",
                      help="submit what can be submitted and exit (run again to collect and continue)")
    jobs.add_argument("--cancel", action="store_true", help="cancel the experiment's recorded jobs, run nothing")
    args = parser.parse_args(argv)
    try:
        slots = Slots.plan(args.jobs, args.devices, args.jobs_per_device)
        cluster = None
        if args.executor != "local" or args.cancel:
            if args.devices or args.jobs_per_device:
                raise ExperimentError("--devices and --jobs-per-device are for --executor local; a cluster job asks "
                                      "for trainer.devices x trainer.num_nodes GPUs itself")
            cluster = ClusterOptions("slurm" if args.executor == "local" else args.executor, args.slurm_partition,
                                     args.slurm_time, args.slurm_account, ClusterOptions.parse_params(args.slurm_param),
                                     args.jobs)
        elif args.no_wait:
            raise ExperimentError("--no-wait is for --executor slurm (local stages end with their runner)")
        select = dict(s.split("=", 1) for s in args.select if "=" in s)
        if len(select) != len(args.select):
            raise ExperimentError(f"--select takes AXIS=VALUE, got {args.select}")
        configs = load_experiments(args.config, select)  # a sweep file: one experiment per point, in turn
        for config in configs:
            out = Path(args.out or config.out or Path("runs") / "rethink" / config.name)
            if args.out and len(configs) > 1:
                out = out / config.name
            protocol = Protocol(config, out)
            if args.cancel:
                protocol.cancel(cluster)
            else:
                protocol.run(dry_run=args.dry_run, verbose=args.verbose, slots=slots, cluster=cluster,
                             wait=not args.no_wait)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
