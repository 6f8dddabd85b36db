"""The protocol runner (``python -m lit_prune.rethink``) with every stage's command replaced by
``tests/protocol/fake_job.py`` (no torch in the stages, no training), for the tests of stages side by side
and of cluster jobs.

    python tests/protocol/fake_jobs_runner.py --config EXP --out OUT --jobs 3 [...]

Environment: ``FAKE_ARTIFACT`` (the artifact every prune stage copies), ``FAKE_SECONDS`` (each stage's
duration, default 0.4), ``FAKE_FAIL`` (see fake_job.py), ``STAGE_LOCK_WAIT`` and ``STOP_GRACE`` (the
runner's). Events land in ``OUT/events.jsonl``; the report is replaced by an empty one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from lit_prune.protocol import plan
from tests.protocol.fake_runner import main, planned

FAKE_JOB = Path(__file__).with_name("fake_job.py")


def fake_stages(self: plan.Planner) -> list[plan.Stage]:
    events = self.layout.root / "events.jsonl"
    # the real command's arguments follow (fake_job.py records them): what the runner reads from a command
    # (a cluster job's devices and nodes) is still there
    return [replace(st, command=[sys.executable, str(FAKE_JOB), str(events), str(st.dir), st.kind,
                                 os.environ.get("FAKE_SECONDS", "0.4"), os.environ["FAKE_ARTIFACT"], *st.command[3:]])
            for st in planned(self)]


if __name__ == "__main__":
    sys.exit(main(fake_stages))
