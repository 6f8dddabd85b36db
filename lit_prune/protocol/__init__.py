"""The protocol of "Rethinking the Value of Network Pruning", run from one experiment config.

For every seed: train the large model (with the method's callback where it needs one, e.g. slimming's
sparsity), prune it to an artifact per variant, test the pruned model before retraining, then fine-tune,
Scratch-E and Scratch-B it. Every training stage is its own ``python -m lit_prune.stage`` process (so it
runs under any strategy, DDP included: Lightning's launcher re-executes the stage on each rank). The
results land in ``results.md``, ``results.json`` and ``results.png`` of the experiment directory, and
TensorBoard runs in ``<out>/tb`` (one run per variant, stage and seed).

The runner is resumable: a stage is done when its ``metrics.json`` (or its artifact) exists and reads
back; a killed stage restarts from its last checkpoint. An experiment directory belongs to one config
(its hash is kept in ``experiment.json``); another config is refused rather than mixed in.

    config.py   ExperimentConfig: the YAML schema (documented there), validated once; hash; stage settings
    layout.py   RunLayout: every path of an experiment directory
    plan.py     Stage, Planner: the stages, their commands and epochs, Scratch-B's budget
    run.py      Protocol: sequential execution, resume, the directory's config check
    executor.py stages side by side (--jobs, --devices): dependencies, device slots, the scheduler
    slurm.py    stages as cluster jobs (--executor slurm, through submitit), jobs.json, --cancel
    report.py   collect, results.md / results.json / results.png
    cli.py      python -m lit_prune.rethink (also python -m lit_prune.protocol)
    stage.py    one stage, python -m lit_prune.stage (imports Lightning; nothing here imports it)

Importing this package stays light (no torch, no Lightning): they load when a run reads its artifacts.
"""

from lit_prune.protocol.config import (
    DEFAULTS,
    REGIMES,
    ExperimentConfig,
    ExperimentError,
    LargeConfig,
    RegimeConfig,
    SourceRef,
    StageSettings,
    VariantConfig,
    config_hash,
    load_experiment,
)
from lit_prune.protocol.layout import RunLayout, read_metrics
from lit_prune.protocol.plan import Planner, ScratchB, Stage
from lit_prune.protocol.report import LABELS, collect, plot, write_results
from lit_prune.protocol.run import Protocol

__all__ = [
    "DEFAULTS", "LABELS", "REGIMES", "ExperimentConfig", "ExperimentError", "LargeConfig", "Planner", "Protocol",
    "RegimeConfig", "RunLayout", "ScratchB", "SourceRef", "Stage", "StageSettings", "VariantConfig", "collect",
    "config_hash", "load_experiment", "plot", "read_metrics", "write_results",
]
