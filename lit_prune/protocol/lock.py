"""One runner per experiment directory, one process per stage, and stage processes that die with their runner.

Locks (``flock(2)`` on a file, :class:`FileLock`):

- ``<out>/.lock`` is held by a runner for as long as it runs; a second runner on the same directory is
  refused at once, naming the holder's host and pid.
- ``<stage_dir>/.lock`` is held while a stage runs: taken by the runner before it starts the stage's
  process and inherited by that process, so it stays held until the stage itself has ended. A runner
  restarted after a kill -9 therefore waits for the dying stage of its predecessor (a bounded wait)
  instead of training a twin beside it.

The kernel releases an flock when the last process holding the file open ends, however it ends, so a
lock is never stale and no pid is ever checked: the file's content (host, pid, start time, ...) is
informational. It names the holder in a refusal and is left in place on release (it then names the last
holder). On NFS, Linux emulates flock with POSIX byte-range locks, which work across clients.

Stage processes (:func:`start_stage_process`): each stage is started in a session (and process group)
of its own, so that its DDP rank processes and data-loader workers can be stopped together
(:func:`stop_group`); on Linux it also gets ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, so a kill -9 of the
runner still terminates it. Lightning's handler for that SIGTERM forwards it to the rank processes it
launched and stops every rank after its current batch.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking
    fcntl = None  # type: ignore[assignment]

from lit_prune.protocol.config import ExperimentError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def holder_info(**extra: Any) -> dict[str, Any]:
    """What a lock file records of its holder: this host and process, the time, and ``extra``."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), **extra}


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host h, started ...`` (what a refusal says of a lock's holder)."""
    if not holder.get("pid"):
        return "a process that has not recorded itself yet"
    here = holder.get("host") == socket.gethostname()
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}" + ("" if here else " (another machine)")
    if holder.get("runner_pid") and holder["runner_pid"] != holder["pid"]:
        text += f", started by the runner pid {holder['runner_pid']}"
    return text + (f", since {holder['started']}" if holder.get("started") else "")


class LockHeld(ExperimentError):
    """The lock is held by another process, described by ``holder`` (what its lock file records)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing), with a record of its holder in the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def holder(self) -> dict[str, Any]:
        """What the file records of its (last) holder; {} if nothing readable."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def try_acquire(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """Take the lock and record ``info`` in it: None, or what the file records of the current holder."""
        assert self.fd is None, f"{self} is already held"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (O_CLOEXEC, PEP 446)
        except OSError as err:
            raise ExperimentError(f"cannot create the lock file {self.path}: {err.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                # the holder may be between taking the lock and writing its record
                for _ in range(10):
                    holder = self.holder()
                    if holder:
                        break
                    time.sleep(0.02)
                return holder
        self.fd = fd
        self.update(info)
        return None

    def acquire(self, info: dict[str, Any], *, wait: float = 0.0, poll: float = 0.1,
                on_wait: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Take the lock, waiting up to ``wait`` seconds for its holder to release it.

        Raises:
            LockHeld: it is still held (the message names the holder).
        """
        deadline = time.monotonic() + wait
        holder = self.try_acquire(info)
        if holder is not None and wait > 0 and on_wait is not None:
            on_wait(holder)
        while holder is not None and time.monotonic() < deadline:
            time.sleep(poll)
            holder = self.try_acquire(info)
        if holder is not None:
            raise LockHeld(f"{self.path} is held by {describe(holder)}", holder)

    def update(self, info: dict[str, Any]) -> None:
        """Replace the holder's record (e.g. to add the pid of the stage process it started)."""
        assert self.fd is not None, f"{self} is not held"
        data = (json.dumps(info, sort_keys=True) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Close the file. The lock ends when no process holds the file open any more (a stage process
        that inherited it keeps it until it ends); the record stays, naming the last holder."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- stage processes ------------------------------------------------------------------------------------

def _prctl() -> Any:
    """libc's ``prctl`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux; False elsewhere).

    A process that its parent launched (e.g. a DDP rank started by rank 0) can call it first thing; the
    setting is cleared in children of a fork, so every process that needs it sets it for itself."""
    prctl, parent = _prctl(), os.getppid()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent ended before the setting took effect
        os.kill(os.getpid(), sig)
    return True


def _parent_death_preexec(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child ``PR_SET_PDEATHSIG`` ``sig`` (libc looked up before the fork)."""
    prctl, runner = _prctl(), os.getpid()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != runner:  # the runner died between the fork and the prctl
            os.kill(os.getpid(), sig)

    return preexec


def start_stage_process(command: Sequence[str], *, stdout: int | IO[Any] | None = None,
                        stderr: int | IO[Any] | None = None, pass_fds: Sequence[int] = (),
                        env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a stage's process: its own session and process group (its pid is the group's id), SIGTERM
    when the runner dies (Linux), no terminal input (a stage in a background group must not stop on a
    read), and the descriptors ``pass_fds`` (the stage's lock) inherited. ``env``: variables set on top of
    the runner's environment (a job's device and threads)."""
    return subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, preexec_fn=_parent_death_preexec(signal.SIGTERM),
                            pass_fds=tuple(pass_fds), env={**os.environ, **env} if env else None)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of the process group ``pgid``; from /proc where there is one."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and fields[0] not in "ZX" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """End every process of ``proc``'s group (``proc`` started by :func:`start_stage_process`): ``sig``,
    then SIGKILL to what is left after ``grace`` seconds. Reaps ``proc``; True when the group is gone.

    A group already empty (the stage ended, and its ranks with it) costs one look at /proc."""
    pgid = proc.pid

    def gone() -> bool:
        proc.poll()
        if group_members(pgid):
            return False
        proc.poll()  # the leader may have become a zombie since the first poll
        return True

    if gone():
        return True
    signal_group(pgid, sig)
    for limit, then in ((grace, signal.SIGKILL), (5.0, None)):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if gone():
                return True
            time.sleep(0.05)
        if then is not None:
            signal_group(pgid, then)
    return gone()
