"""Execution: the stages one after the other, each its own process, skipping those already done (with
several jobs, independent stages side by side: :mod:`lit_prune.protocol.executor`).

An experiment directory belongs to one config: ``experiment.json`` keeps its hash, and another config is
refused rather than mixed in. A directory written before the hash covered the files named in ``args``
(``hash_version`` 1) is recognised by its old hash and re-tied to the new one when nothing the old hash
left out is at stake; otherwise the message says what to do.

One runner at a time: a run holds ``<out>/.lock`` for its lifetime, and each stage's ``.lock`` while the
stage runs (:mod:`lit_prune.protocol.lock`); a second runner is refused, naming the first one's host and
pid. A stage's process is in a process group of its own and dies with the runner: SIGTERM, SIGINT or
SIGHUP to the runner stop the running stage's whole group (DDP ranks included) before the runner exits,
and on Linux a kill -9 of the runner sends the stage SIGTERM (parent-death signal). Running the same
command again resumes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lit_prune.protocol.config import HASH_VERSION, ExperimentConfig, ExperimentError
from lit_prune.protocol.layout import ARTIFACT, RunLayout, read_metrics
from lit_prune.protocol.lock import (
    FileLock,
    LockHeld,
    describe,
    holder_info,
    signal_group,
    start_stage_process,
    stop_group,
)
from lit_prune.protocol.plan import Planner, ScratchB, Stage

if TYPE_CHECKING:
    from lit_prune.protocol.executor import Slots
    from lit_prune.protocol.slurm import ClusterOptions

#: how a stage's per-epoch progress lines start (lit_prune.callbacks.progress.PREFIX; not imported from there,
#: since the runner loads no Lightning)
PROGRESS_PREFIX = "epoch "

#: how long a runner waits for a stage still held by the process of an earlier runner (one that was
#: killed: its stage got SIGTERM from the kernel, and Lightning stops it after the current batch)
STAGE_LOCK_WAIT = 120.0
#: seconds between SIGTERM and SIGKILL when the runner stops a stage's process group
STOP_GRACE = 10.0
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Interrupted(ExperimentError):
    """The runner got SIGTERM, SIGINT or SIGHUP; the running stage's processes were stopped."""

    def __init__(self, signum: int, *stages: str) -> None:
        name = signal.Signals(signum).name
        during = ""
        if len(stages) == 1:
            during = f" during stage '{stages[0]}' (its processes were stopped)"
        elif stages:
            during = f" during stages {', '.join(repr(s) for s in stages)} (their processes were stopped)"
        super().__init__(f"interrupted by {name}{during}; run the same command again to resume")
        self.signum = signum


def _save_json(obj: Any, path: Path) -> None:
    from lit_prune.io import atomic_save_json

    atomic_save_json(obj, path)


class Protocol:
    """Plans and runs the stages of one experiment in ``out``."""

    def __init__(self, config: ExperimentConfig, out: str | Path, python: str = sys.executable) -> None:
        self.config = config
        self.layout = RunLayout(out)
        self.out = self.layout.root
        self.planner = Planner(config, self.layout, python)
        self.hash = config.hash
        self._stage_proc: subprocess.Popen | None = None  # the running stage's process (its group's leader)
        self._stage_lock: FileLock | None = None
        self._interrupted: int | None = None
        # the stages in flight of a run with several jobs (lit_prune.protocol.executor.ParallelRun); None otherwise
        self._in_flight: dict[str, subprocess.Popen] | None = None

    @property
    def epochs(self) -> int:
        """The large model's epochs (what Scratch-E repeats and Scratch-B stretches)."""
        return self.planner.epochs

    def plan(self) -> list[Stage]:
        return self.planner.stages()

    def scratch_b(self, st: Stage) -> ScratchB:
        return self.planner.scratch_b(st)

    # -- the directory
    def prepare(self) -> None:
        """Tie the directory to this config, refusing one made by another config."""
        self._make_out()
        marker = self.layout.marker
        if not marker.is_file():
            self._write_marker()
            return
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise ExperimentError(f"{marker} is not an experiment record (it does not read back as JSON); use "
                                  "another --out, or delete that directory to start over")
        if old.get("hash") == self.hash:
            return
        if "hash_version" not in old and old.get("hash") == self.config.legacy_hash:
            self._adopt_legacy_marker(old)
            return
        changed = ""
        if isinstance(old.get("files"), dict):
            files = self.config.file_digests()
            diff = sorted(f for f in {*files, *old["files"]} if files.get(f) != old["files"].get(f))
            changed = f"; files that differ: {', '.join(diff)}" if diff else ""
        elif "hash_version" not in old:
            changed = " (written by an older lit-prune, whose hash did not cover the files named in args)"
        raise ExperimentError(
            f"{self.out} holds results of another config (hash {old.get('hash')}, this one {self.hash}, "
            f"experiment {old.get('name')!r}){changed}; use another --out, or delete that directory to start over")

    def _write_marker(self) -> None:
        _save_json({"name": self.config.name, "hash": self.hash, "hash_version": HASH_VERSION,
                    "files": self.config.file_digests(), "config": self.config.to_dict()}, self.layout.marker)

    def _adopt_legacy_marker(self, old: dict[str, Any]) -> None:
        """A directory this config made under the old hash (which left out the files named in args)."""
        unchecked = self.config.arg_files
        if unchecked:
            raise ExperimentError(
                f"{self.out} was made by this config under an older lit-prune, whose hash (hash {old['hash']}) did "
                f"not cover the files named in args ({', '.join(unchecked)}), so it cannot tell whether they changed "
                f"since. If they did not, set \"hash\" in {self.layout.marker} to {self.hash} and run again; "
                "otherwise use another --out, or delete that directory to start over")
        print(f"{self.layout.marker}: written under the older config hash {old['hash']}, which this config matches; "
              f"now tied to hash {self.hash}", flush=True)
        self._write_marker()

    def _make_out(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExperimentError(f"cannot use --out {self.out} ({err.strerror}: {err.filename}); choose a folder "
                                  "that can be created and written") from None

    # -- one runner at a time
    @contextmanager
    def locked(self) -> Iterator[FileLock]:
        """Hold the experiment directory's lock (a second runner is refused, naming this one)."""
        self._make_out()
        lock = FileLock(self.layout.lock)
        try:
            lock.acquire(holder_info(command=sys.argv))
        except LockHeld as held:
            pid = held.holder.get("pid")
            stop = f" (or stop it: kill {pid})" if pid else ""
            raise ExperimentError(
                f"{self.out} is in use by another runner: {describe(held.holder)}; wait for it to finish{stop}, "
                f"then run the same command again (the lock {self.layout.lock} ends with that process, "
                "however it ends)") from None
        try:
            yield lock
        finally:
            lock.release()

    @contextmanager
    def _stage_locked(self, st: Stage) -> Iterator[FileLock]:
        """Hold the stage's lock (waiting, for a bounded time, for a stage process of an earlier runner)."""
        st.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.layout.stage_lock(st.dir))

        def waiting(holder: dict[str, Any]) -> None:
            print(self.waiting_message(st, holder), flush=True)

        try:
            lock.acquire(holder_info(runner_pid=os.getpid(), stage=st.label), wait=STAGE_LOCK_WAIT, on_wait=waiting)
        except LockHeld as held:
            raise self.still_running(st, held.holder, lock.path) from None
        self._stage_lock = lock
        try:
            yield lock
        finally:
            self._stage_lock = None
            lock.release()

    @contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """SIGTERM, SIGINT and SIGHUP stop the running stage's processes, then the runner (with a message).
        Signals ignored when the run starts (nohup) stay ignored; off the main thread nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for sig in _SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        first = self._interrupted is None
        self._interrupted = self._interrupted or signum
        procs = [self._stage_proc] if self._stage_proc is not None else list((self._in_flight or {}).values())
        if not procs and self._in_flight is None:
            raise Interrupted(signum)
        # stages are running: _execute (or the parallel scheduler's loop) stops their groups (SIGTERM, SIGKILL
        # after STOP_GRACE s) and raises; a second signal does not wait for that
        if not first:
            for proc in procs:
                signal_group(proc.pid, signal.SIGKILL)

    # -- what the runner says of a stage (one wording, sequential or side by side)
    @staticmethod
    def waiting_message(st: Stage, holder: dict[str, Any]) -> str:
        return (f"    {st.label}: still running in {describe(holder)}; waiting up to {STAGE_LOCK_WAIT:g} s "
                "for it to end ...")

    @staticmethod
    def still_running(st: Stage, holder: dict[str, Any], lock_path: Path) -> ExperimentError:
        pid = holder.get("pid")
        stop = f" (or stop its process group: kill -TERM -- -{pid})" if pid else ""
        return ExperimentError(f"stage '{st.label}' is still running: {describe(holder)} (lock {lock_path}); wait for "
                               f"it to end{stop}, then run the same command again")

    def unfinished(self, st: Stage) -> ExperimentError:
        return ExperimentError(
            f"stage '{st.label}' ended (exit 0) without finishing: its "
            f"{'artifact' if st.kind == 'prune' else 'metrics.json'} is missing in {st.dir}; was it "
            f"terminated? Run the same command again to resume; log: {self.layout.stage_log(st.dir)}")

    def failed(self, st: Stage, returncode: int, verbose: bool) -> ExperimentError:
        log_path = self.layout.stage_log(st.dir)
        tail = "" if verbose else "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        return ExperimentError(f"stage '{st.label}' failed (exit {returncode}); log: {log_path}\n{tail}\n"
                               f"command: {shlex.join(st.command)}")

    # -- running
    def run(self, *, dry_run: bool = False, verbose: bool = False, slots: Slots | None = None,
            cluster: ClusterOptions | None = None, wait: bool = True) -> dict[str, Any]:
        """Run every stage not done yet (holding the directory's lock), or with ``dry_run`` print them.

        ``slots`` (:class:`~lit_prune.protocol.executor.Slots`): with more than one job, independent stages
        run side by side (:class:`~lit_prune.protocol.executor.ParallelRun`); by default one after the other.
        ``cluster`` (:class:`~lit_prune.protocol.slurm.ClusterOptions`): every stage a job of a cluster
        (:mod:`lit_prune.protocol.slurm`), collected until all are done (``wait``) or left to run."""
        if dry_run:
            results = self._run(self.plan(), dry_run=True, verbose=verbose)
            if cluster is not None:
                from lit_prune.protocol.slurm import dry_run_note

                dry_run_note(self, self.plan(), cluster)
            return results
        self._interrupted = None
        stages = self.plan()
        if self.layout.marker.is_file():
            self.prepare()  # another config is refused before anything in the directory changes
        with self.locked():
            self.prepare()  # under the lock: the marker of a new directory is written by one runner only
            with self._signals_handled():
                if cluster is not None:
                    return self._run_jobs(stages, cluster, wait)
                if slots is None or slots.jobs == 1 and not slots.devices:
                    return self._run(stages, dry_run=False, verbose=verbose)
                from lit_prune.protocol.executor import ParallelRun

                t_start = time.time()
                ParallelRun(self, stages, slots, verbose).run()
                return self.report(t_start)

    def _run_jobs(self, stages: list[Stage], cluster: ClusterOptions, wait: bool) -> dict[str, Any]:
        from lit_prune.protocol.slurm import SubmititRun

        t_start = time.time()
        try:
            finished = SubmititRun(self, stages, cluster).run(wait=wait)
        except Interrupted as stop:
            name = signal.Signals(stop.signum).name
            raise ExperimentError(f"interrupted by {name}; the submitted jobs keep running: run the same command "
                                  "again to collect them and continue, or with --cancel to cancel them") from None
        return self.report(t_start) if finished else {}

    def cancel(self, cluster: ClusterOptions) -> list[str]:
        """Cancel the jobs recorded in the directory that are still queued or running (their labels)."""
        from lit_prune.protocol.slurm import cancel

        return cancel(self, cluster)

    def _run(self, stages: list[Stage], *, dry_run: bool, verbose: bool) -> dict[str, Any]:
        t_start = time.time()
        for i, st in enumerate(stages, 1):
            head = f"[{i}/{len(stages)}] {st.label}"
            if self.planner.needs_budget(st):
                if dry_run and not self.planner.budget_known(st):
                    st = replace(st, note=self.planner.pending_note())
                else:
                    st = self.scratch_b(st).applied_to(st)
            if dry_run:
                epochs = f" ({st.epochs} epochs)" if st.epochs is not None else ""
                print(f"{head}{epochs}{' - ' + st.note if st.note else ''}")
                if st.command:
                    print("    " + shlex.join(st.command))
                continue
            if st.done():
                print(f"{head}: done, skipped")
                continue
            if st.kind == "prune" and not st.command:
                with self._stage_locked(st):
                    self._adopt_training_artifact(st)
                print(f"{head}: {st.note}")
                continue
            with self._stage_locked(st):
                if st.done():  # finished by the stage process of an earlier runner, waited for above
                    print(f"{head}: done, skipped")
                    continue
                if st.kind != "prune":
                    self._write_stage_yaml(st)
                epochs = f", {st.epochs} epochs" if st.epochs else ""
                print(f"{head}{epochs}{' (' + st.note + ')' if st.note else ''} ...", flush=True)
                t0 = time.time()
                self._execute(st, verbose)
                if not st.done():
                    raise self.unfinished(st)
            m = read_metrics(st.dir)
            acc = f", test acc1 {100 * m['acc1']:.2f}%" if m else ""
            print(f"    done in {time.time() - t0:.1f} s{acc}", flush=True)
        if dry_run:
            return {}
        return self.report(t_start)

    def report(self, t_start: float) -> dict[str, Any]:
        """Collect every stage's metrics, write results.md/.json/.png and print the table."""
        from lit_prune.protocol.report import collect, write_results

        results = collect(self.config, self.layout)
        write_results(self.config, self.layout, results)
        print(f"\nall stages finished in {time.time() - t_start:.1f} s\n")
        print(self.layout.results_md.read_text())
        print(f"results: {self.layout.results_md}, {self.layout.results_json}, {self.layout.results_png}")
        print(f"TensorBoard: tensorboard --logdir {self.layout.tb}")
        return results

    def _write_stage_yaml(self, st: Stage) -> None:
        st.dir.mkdir(parents=True, exist_ok=True)
        self.layout.stage_yaml(st.dir).write_text(yaml.safe_dump(self.planner.stage_yaml(st)))

    def _adopt_training_artifact(self, st: Stage) -> None:
        from lit_prune.artifact import load_artifact

        assert st.variant is not None, st
        artifact = self.config.variant(st.variant).from_training
        assert artifact is not None, st
        places = self.layout.training_artifact_places(st.seed)
        found = [p for place in places for p in sorted(place.rglob(artifact))]
        if not found:
            raise ExperimentError(f"the large run of seed {st.seed} wrote no {artifact} (looked in "
                                  f"{places[0]} and {places[1]}); does the base config (or large.args) attach the "
                                  "method's callback?")
        st.dir.mkdir(parents=True, exist_ok=True)
        load_artifact(found[0])  # validate before adopting
        shutil.copyfile(found[0], st.dir / ARTIFACT)

    def _execute(self, st: Stage, verbose: bool) -> None:
        """Run the stage's command as its own process group, holding the stage's lock (inherited by the
        process), until it ends; on a signal to the runner, stop the group and raise :class:`Interrupted`."""
        st.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.layout.stage_log(st.dir)
        lock = self._stage_lock
        proc: subprocess.Popen | None = None
        with open(log_path, "ab") as log:
            try:
                proc = start_stage_process(st.command, stdout=None if verbose else log,
                                           stderr=None if verbose else subprocess.STDOUT,
                                           pass_fds=[lock.fd] if lock is not None and lock.fd is not None else [])
                self._stage_proc = proc
                if lock is not None:
                    lock.update(holder_info(pid=proc.pid, runner_pid=os.getpid(), stage=st.label,
                                            command=st.command))
                echo = _ProgressEcho(log_path) if not verbose else None
                while proc.poll() is None and self._interrupted is None:
                    try:
                        proc.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        pass
                    if echo is not None:
                        echo.poll()
                if echo is not None:
                    echo.poll()
            finally:
                if proc is not None:
                    # what is left of the group (the ranks of a DDP stage, a signal's target) ends here;
                    # a second signal meanwhile only escalates to SIGKILL (see _on_signal)
                    stopped = stop_group(proc, STOP_GRACE)
                    self._stage_proc = None
                    if not stopped:
                        print(f"warning: processes of stage '{st.label}' (group {proc.pid}) survived SIGKILL",
                              file=sys.stderr, flush=True)
        if self._interrupted is not None:
            raise Interrupted(self._interrupted, st.label)
        if proc.returncode != 0:
            raise self.failed(st, proc.returncode, verbose)


class _ProgressEcho:
    """Prints the per-epoch progress lines a stage appends to its log, after ``prefix``: indented under the
    stage's line, or (stages side by side) after the stage's label."""

    def __init__(self, log_path: Path, prefix: str = "    ") -> None:
        self.path, self.offset, self.partial = log_path, log_path.stat().st_size if log_path.exists() else 0, b""
        self.prefix = prefix

    def poll(self) -> list[str]:
        """Print the progress lines appended since the last call; returns them."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        found = []
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith(PROGRESS_PREFIX):
                print(f"{self.prefix}{line}", flush=True)
                found.append(line)
        return found
