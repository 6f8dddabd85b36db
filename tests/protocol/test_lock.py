"""One runner per experiment directory, one process per stage, and stages that die with their runner
(``lit_prune.protocol.lock``, ``Protocol.run``).

The runner runs as a real process (``tests/protocol/fake_runner.py``: the real runner and CLI, its one stage's
command replaced by ``tests/protocol/fake_stage.py``, which sleeps beside one child process of its own, as a
DDP stage's launcher does beside its ranks): no torch, no training, well under a second per runner and
stage. Every wait is bounded, and every process a test starts is SIGKILLed at its end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lit_prune.protocol import ExperimentError, Protocol, load_experiment
from lit_prune.protocol.lock import FileLock, LockHeld, group_members, holder_info
from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/experiments/quickstart.yaml"
FAKE_RUNNER = Path(__file__).with_name("fake_runner.py")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)


class RunnerProcesses:
    """Fake runner processes (``script``) on one experiment directory, with their output in log files; every
    process they or their stages started is SIGKILLed by :meth:`cleanup`."""

    def __init__(self, tmp_path: Path, script: Path) -> None:
        self.tmp, self.script, self.out = tmp_path, script, tmp_path / "out"
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], env: dict[str, str], **popen: object) -> subprocess.Popen:
        n = len(self.procs)
        logs = (self.tmp / f"runner{n}.out", self.tmp / f"runner{n}.err")
        with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
            proc = subprocess.Popen([sys.executable, str(self.script), "--out", str(self.out), *args], cwd=REPO,
                                    env=clean_env(extra=env), stdout=stdout, stderr=stderr, **popen)
        proc.logs = logs  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the runner pid {proc.pid} did not end within {timeout} s")
        out, err = (p.read_text() for p in proc.logs)  # type: ignore[attr-defined]
        return rc, out, err

    def stage_processes(self) -> list[int]:
        """The pids the fake stages recorded (each subclass reads its own events)."""
        return []

    def cleanup(self) -> None:
        for pid in [*self.stage_processes(), *(p.pid for p in self.procs)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


class Runners(RunnerProcesses):
    """Fake runners of one fake stage (``fake_runner.py``)."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, FAKE_RUNNER)
        self.stage_dir = self.out / "seed0" / "large"

    def start(self, *args: str, mode: str = "sleep", **env: str) -> subprocess.Popen:
        return self.spawn(["--config", CONFIG, *args], {"FAKE_STAGE_MODE": mode, **env}, start_new_session=True)

    def events(self) -> list[dict]:
        path = self.stage_dir / "fake_stage.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def started_stages(self) -> list[dict]:
        return [e for e in self.events() if e["event"] == "start"]

    def wait_for_stage(self, n: int = 1, timeout: float = 60) -> dict:
        """The n-th start of the stage (its pid and its child's), once it has recorded itself."""
        wait_for(lambda: len(self.started_stages()) >= n, timeout, f"stage start {n}")
        return self.started_stages()[n - 1]

    def stage_processes(self) -> list[int]:
        return [pid for e in self.started_stages() for pid in (e["pid"], e["child"]) if pid]


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[Runners]:
    r = Runners(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


# ---- the lock itself ------------------------------------------------------------------------------------

def test_a_held_lock_refuses_a_second_holder_naming_it_and_is_free_once_released(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    first, second = FileLock(path), FileLock(path)
    first.acquire(holder_info(note="first"))
    try:
        with pytest.raises(LockHeld) as held:
            second.acquire(holder_info(), wait=0.2, poll=0.05)
        assert held.value.holder["pid"] == os.getpid() and held.value.holder["note"] == "first"
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(held.value)
        assert isinstance(held.value, ExperimentError)
    finally:
        first.release()
    second.acquire(holder_info(note="second"))
    second.release()
    assert FileLock(path).holder()["note"] == "second"  # the record names the last holder


def test_a_lock_whose_holder_was_killed_with_sigkill_is_free(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lit_prune.protocol.lock import FileLock, holder_info\n"
         f"FileLock({str(path)!r}).acquire(holder_info())\nprint('held', flush=True)\ntime.sleep(60)"],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert FileLock(path).try_acquire(holder_info())["pid"] == holder.pid
        holder.kill()
        holder.wait(10)
        assert FileLock(path).holder()["pid"] == holder.pid  # the stale record stays: it is not the lock
        lock = FileLock(path)
        assert lock.try_acquire(holder_info()) is None
        lock.release()
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()


def test_the_runner_holds_the_directory_lock_while_it_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    protocol = Protocol(load_experiment(CONFIG), tmp_path / "out")
    seen = []

    def look(self: Protocol, stages, **kwargs) -> dict:
        lock = FileLock(self.layout.lock)
        seen.append(lock.try_acquire({}))
        lock.release()
        return {}

    monkeypatch.setattr(Protocol, "_run", look)
    protocol.run()
    assert seen[0]["pid"] == os.getpid() and seen[0]["command"] == sys.argv
    protocol.run(dry_run=True)  # a dry run takes no lock
    assert seen[1] is None


# ---- runners -------------------------------------------------------------------------------------------

def test_a_second_runner_on_a_locked_directory_refuses_naming_the_first(runners: Runners) -> None:
    first = runners.start()
    runners.wait_for_stage()
    second = runners.start()
    rc, _, err = runners.finish(second)
    assert rc == 2, err
    assert err.startswith(f"error: {runners.out} is in use by another runner: pid {first.pid} on host "
                          f"{socket.gethostname()}"), err
    assert "Traceback" not in err and f"kill {first.pid}" in err
    assert len(runners.started_stages()) == 1  # the second runner started nothing
    # a dry run only prints: the lock does not stop it
    rc, out, err = runners.finish(runners.start("--dry-run"))
    assert rc == 0 and "[1/1] seed 0 | large" in out, err
    assert first.poll() is None and alive(runners.started_stages()[0]["pid"])


@linux_only
def test_sigterm_to_the_runner_stops_its_stage_and_says_how_to_resume(runners: Runners) -> None:
    runner = runners.start()
    stage = runners.wait_for_stage()
    record = json.loads((runners.stage_dir / ".lock").read_text())
    assert (record["pid"], record["runner_pid"]) == (stage["pid"], runner.pid)  # the stage lock names the stage
    runner.send_signal(signal.SIGTERM)
    rc, _, err = runners.finish(runner)
    assert rc == 2 and err.strip() == ("error: interrupted by SIGTERM during stage 'seed 0 | large' (its processes "
                                       "were stopped); run the same command again to resume"), err
    assert not alive(stage["pid"]) and not alive(stage["child"])  # the child: a DDP rank of the stage's group
    assert not group_members(stage["pid"])
    for path in (runners.out / ".lock", runners.stage_dir / ".lock"):
        lock = FileLock(path)
        assert lock.try_acquire({}) is None, path
        lock.release()


@linux_only
def test_a_stage_that_ignores_sigterm_is_killed_after_the_grace_period(runners: Runners) -> None:
    runner = runners.start(mode="ignore-term", STOP_GRACE="1")
    stage = runners.wait_for_stage()
    runner.send_signal(signal.SIGINT)
    rc, _, err = runners.finish(runner, timeout=30)
    assert rc == 2 and "interrupted by SIGINT" in err, err
    assert not alive(stage["pid"]) and not alive(stage["child"])


@linux_only
def test_sigkill_of_the_runner_ends_its_stage_and_does_not_block_a_restart(runners: Runners) -> None:
    runner = runners.start()
    stage = runners.wait_for_stage()
    runner.kill()
    runner.wait(10)
    # the kernel sends the stage SIGTERM (parent-death signal); it forwards it to its child, as Lightning does
    wait_for(lambda: not alive(stage["pid"]) and not alive(stage["child"]), 10, "the orphaned stage's end")
    rc, out, err = runners.finish(runners.start(mode="finish"))
    assert rc == 0, err
    assert "[1/1] seed 0 | large, 4 epochs ..." in out and len(runners.started_stages()) == 2


@linux_only
def test_a_restart_waits_for_the_dying_stage_of_a_killed_runner(runners: Runners) -> None:
    # the orphan takes a second to stop (Lightning ends its current batch); the restart must not overlap it
    runner = runners.start(FAKE_TERM_DELAY="1.5")
    stage = runners.wait_for_stage()
    runner.kill()
    runner.wait(10)
    rc, out, err = runners.finish(runners.start(mode="finish"))
    assert rc == 0, err
    assert f"seed 0 | large: still running in pid {stage['pid']}" in out, out
    end = next(e for e in runners.events() if e["event"] == "end" and e["pid"] == stage["pid"])
    restarted = runners.started_stages()[1]
    assert restarted["t"] >= end["t"], "the restarted stage ran beside the orphan"


@linux_only
def test_a_restart_refuses_a_stage_still_running_without_its_runner(runners: Runners) -> None:
    runner = runners.start(mode="ignore-term")  # an orphan that does not stop on the parent-death signal
    stage = runners.wait_for_stage()
    runner.kill()
    runner.wait(10)
    rc, out, err = runners.finish(runners.start(mode="finish", STAGE_LOCK_WAIT="0.5"))
    assert rc == 2, out + err
    assert err.startswith(f"error: stage 'seed 0 | large' is still running: pid {stage['pid']} on host "
                          f"{socket.gethostname()}, started by the runner pid {runner.pid}"), err
    assert f"kill -TERM -- -{stage['pid']}" in err and "Traceback" not in err
    assert len(runners.started_stages()) == 1 and alive(stage["pid"])
