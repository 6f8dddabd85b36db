"""The protocol runner (``python -m lit_prune.rethink``) with one fake stage, for the lock and signal tests.

    python tests/protocol/fake_runner.py --config configs/experiments/quickstart.yaml --out OUT [--dry-run]

The experiment is planned as usual, then replaced by its first stage (``seed 0 | large``) whose command is
``tests/protocol/fake_stage.py`` (no torch, no training). Environment: ``FAKE_STAGE_MODE`` (``sleep``,
``ignore-term``, ``finish``), ``FAKE_TERM_DELAY`` (seconds), ``STAGE_LOCK_WAIT`` and ``STOP_GRACE``
(seconds, the runner's). The report is replaced by an empty one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from lit_prune.protocol import cli, plan, report, run

FAKE_STAGE = Path(__file__).with_name("fake_stage.py")
planned = plan.Planner.stages


def one_fake_stage(self: plan.Planner) -> list[plan.Stage]:
    st = planned(self)[0]
    command = [sys.executable, str(FAKE_STAGE), str(st.dir), os.environ.get("FAKE_STAGE_MODE", "sleep"),
               os.environ.get("FAKE_TERM_DELAY", "0")]
    return [replace(st, command=command)]


def no_report(config, layout, results=None):
    layout.results_md.write_text("(fake report)\n")
    return {}


def main(stages) -> int:
    """The runner's main with ``stages`` as the planner's stages, no report, and the waits from the environment."""
    plan.Planner.stages = stages
    report.collect = no_report
    report.write_results = no_report
    for name in ("STAGE_LOCK_WAIT", "STOP_GRACE"):
        if name in os.environ:
            setattr(run, name, float(os.environ[name]))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main(one_fake_stage))
