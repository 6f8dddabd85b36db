"""A stand-in for a stage's process (``python -m lit_prune.stage``) in the runner's lock and signal tests.

    python tests/protocol/fake_stage.py STAGE_DIR MODE TERM_DELAY

It starts one child of its own (as Lightning's DDP launcher starts the other ranks: same process group)
and records ``{"event": "start", "pid", "child", "t"}`` in ``STAGE_DIR/fake_stage.jsonl``. MODE:

- ``sleep``: train for a minute. On SIGTERM it does what Lightning does: forwards the signal to its child,
  waits ``TERM_DELAY`` seconds (the current batch), records ``{"event": "end"}`` and exits.
- ``ignore-term``: like ``sleep``, but SIGTERM is ignored (a stage that does not stop).
- ``finish``: write ``metrics.json`` at once and exit 0 (a stage that ends).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def record(stage_dir: Path, **event) -> None:
    with open(stage_dir / "fake_stage.jsonl", "a") as f:
        f.write(json.dumps({**event, "pid": os.getpid(), "t": time.time()}) + "\n")


def main() -> None:
    stage_dir, mode, delay = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    if mode == "finish":
        record(stage_dir, event="start", child=None)
        (stage_dir / "metrics.json").write_text(json.dumps({"acc1": 0.5}))
        record(stage_dir, event="end")
        return
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def on_term(signum, frame):
        child.send_signal(signum)
        time.sleep(delay)
        record(stage_dir, event="end")
        child.wait()
        sys.exit(143)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else on_term)
    record(stage_dir, event="start", child=child.pid)
    time.sleep(60)


if __name__ == "__main__":
    main()
