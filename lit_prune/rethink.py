"""The protocol runner: one command runs a whole experiment of the paper.

    python -m lit_prune.rethink --config configs/experiments/quickstart.yaml
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --out runs/r56 --dry-run

The implementation is the package :mod:`lit_prune.protocol` (the experiment config's format is documented
in ``lit_prune/protocol/config.py`` and by ``--help``); this module is its command and keeps the names it
has always exported.
"""

import sys

from lit_prune.protocol import (
    DEFAULTS,
    LABELS,
    REGIMES,
    ExperimentConfig,
    ExperimentError,
    Protocol,
    RunLayout,
    Stage,
    collect,
    config_hash,
    load_experiment,
    plot,
    read_metrics,
    write_results,
)
from lit_prune.protocol.cli import main

__all__ = ["DEFAULTS", "LABELS", "REGIMES", "ExperimentConfig", "ExperimentError", "Protocol", "RunLayout", "Stage",
           "collect", "config_hash", "load_experiment", "main", "plot", "read_metrics", "write_results"]

if __name__ == "__main__":
    sys.exit(main())
