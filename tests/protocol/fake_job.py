"""A stand-in for any stage's process in the tests of stages side by side (``tests/protocol/test_run_jobs.py``).

    python tests/protocol/fake_job.py EVENTS STAGE_DIR KIND SECONDS ARTIFACT [ARGS...]

Records ``{"event": "start", "stage", "pid", "t", "env": {CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS,
MKL_NUM_THREADS}, "args"}`` in the JSONL file ``EVENTS`` (one line per event, appended: the jobs run side by
side), trains for ``SECONDS`` in two "epochs" (a progress line each, as ``EpochProgress`` writes them), then
finishes as the real stage does: a prune stage copies ``ARTIFACT`` to its ``pruned.pt``, every other stage
writes ``metrics.json``; records ``{"event": "end"}``. ``FAKE_FAIL=<kind>`` makes the stages of that kind
exit 3 instead; ``FAKE_GATE=<file>`` holds every stage after its start until that file exists. SIGTERM is
Python's default: the process ends at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ENV = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def record(events: Path, stage: Path, **event) -> None:
    line = json.dumps({**event, "stage": str(stage), "pid": os.getpid(), "t": time.time()}) + "\n"
    with open(events, "a") as f:  # one write of one short line: appends of the jobs do not interleave
        f.write(line)


def main() -> None:
    events, stage, kind, seconds, artifact = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), \
        sys.argv[5]
    record(events, stage, event="start", env={k: os.environ.get(k) for k in ENV}, args=sys.argv[6:])
    gate = os.environ.get("FAKE_GATE")
    while gate and not Path(gate).exists():  # held until the test opens the gate
        time.sleep(0.05)
    for epoch in (1, 2):
        time.sleep(seconds / 2)
        print(f"epoch {epoch}/2 | train/loss 0.5 | fake", flush=True)
    if os.environ.get("FAKE_FAIL") == kind:
        print("fake failure", flush=True)
        sys.exit(3)
    if kind == "prune":
        shutil.copyfile(artifact, stage / "pruned.pt")
    else:
        (stage / "metrics.json").write_text(json.dumps({"acc1": 0.5, "stage": str(stage)}))
    record(events, stage, event="end")


if __name__ == "__main__":
    main()
