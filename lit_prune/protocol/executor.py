"""Stages side by side (``python -m lit_prune.rethink ... --jobs N``): the stages' dependencies, device slots
and threads per job, and the scheduler that runs independent stages of one experiment concurrently.

A stage starts once the stages it needs are done::

    seed<N>/large                           nothing
    seed<N>/<variant>/prune                 seed<N>/large (iterative pruning: the source variant's regime);
                                            nothing for a predefined architecture (width_config); Section 5's
                                            controls also the prune stages of the variants they copy
    seed<N>/<variant>/pruned, /<regime>     seed<N>/<variant>/prune (Scratch-B's budget is read from its artifact)

so the seeds' chains run side by side, and so do the regimes of one artifact. Every guarantee of the
sequential runner holds for each stage (``lit_prune.protocol.run``): its lock, its own process group, death
with the runner, resume from its last checkpoint, the skip of a finished stage.

Device slots (``--devices 0,1,2,3 --jobs-per-device K``): ``len(devices) * K`` slots, slot ``i`` on device
``devices[i % len(devices)]`` (so ``--jobs`` below the slot count spreads over the devices); a job sees only
its device (``CUDA_VISIBLE_DEVICES``), i.e. one device per stage. With more than one job each stage gets
``cores // jobs`` threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, which torch's intra-op pool follows), so
jobs do not oversubscribe the CPU.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from lit_prune.protocol import run as run_module  # its STAGE_LOCK_WAIT and STOP_GRACE, read when used
from lit_prune.protocol.config import ExperimentConfig, ExperimentError, VariantConfig
from lit_prune.protocol.layout import LARGE, PRUNE, read_metrics
from lit_prune.protocol.lock import FileLock, holder_info, signal_group, start_stage_process, stop_group
from lit_prune.protocol.plan import Stage
from lit_prune.protocol.run import Interrupted, _ProgressEcho

if TYPE_CHECKING:
    from lit_prune.protocol.run import Protocol

#: how long a waiting scheduler sleeps between two looks at its stages
POLL = 0.2
_EPOCH = re.compile(r"epoch (\d+)/(\d+)")


def dependencies(config: ExperimentConfig, stages: Sequence[Stage]) -> dict[str, tuple[str, ...]]:
    """``{stage label: labels of the stages it needs}`` (see the module's docstring); a needed stage that is
    not in ``stages`` is left out."""
    labels = {(st.seed, st.variant, st.kind): st.label for st in stages}
    needs: dict[str, tuple[str, ...]] = {}
    for st in stages:
        if st.kind == LARGE:
            keys = []
        elif st.kind == PRUNE:
            assert st.variant is not None, st
            keys = _prune_needs(config, config.variant(st.variant), st.seed)
        else:
            keys = [(st.seed, st.variant, PRUNE)]
        needs[st.label] = tuple(labels[k] for k in keys if k in labels)
    return needs


def _prune_needs(config: ExperimentConfig, v: VariantConfig, seed: int) -> list[tuple[int, str | None, str]]:
    """What a variant's prune stage reads: the model it prunes (the large one, or its source variant's
    retrained model), and for Section 5's controls the artifacts they copy (uniform and random: the
    method's; guided: those of this experiment it averages)."""

    def model(w: VariantConfig) -> list[tuple[int, str | None, str]]:
        return [(seed, w.source.variant, w.source.regime)] if w.source is not None else [(seed, None, LARGE)]

    if v.width_config:
        return []
    ref = v.uniform or v.random
    if ref is not None:
        return [(seed, ref.of, PRUNE), *model(config.variant(ref.of))]
    if v.guided is not None:
        of = [] if v.guided.source_dir else [(seed, o, PRUNE) for o in v.guided.of]
        return [*of, *model(v)]
    return model(v)


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Slots:
    """Where the concurrent jobs run: ``jobs`` slots, each on one of ``devices`` (if given), with ``threads``
    CPU threads each (None: the environment's)."""

    jobs: int = 1
    devices: tuple[str, ...] = ()
    threads: int | None = None

    @classmethod
    def plan(cls, jobs: int | None = None, devices: str | Sequence[str] | None = None,
             jobs_per_device: int | None = None, cores: int | None = None) -> Slots:
        """The slots of ``--jobs``, ``--devices`` and ``--jobs-per-device``.

        Raises:
            ExperimentError: a count below 1, an empty device list, ``--jobs-per-device`` without
                ``--devices``, or more jobs than device slots.
        """
        if isinstance(devices, str):
            devices = [d.strip() for d in devices.split(",")]
        devs = tuple(devices or ())
        if devices is not None and (not devs or not all(devs)):
            raise ExperimentError(f"--devices must list device indices separated by commas, e.g. 0,1,2,3; got "
                                  f"{','.join(devs)!r}")
        if len(set(devs)) != len(devs):
            raise ExperimentError(f"--devices lists a device twice ({','.join(devs)}); give --jobs-per-device K to run "
                                  "K jobs on each device")
        if jobs_per_device is not None and not devs:
            raise ExperimentError("--jobs-per-device needs --devices (the devices the jobs share)")
        per_device = 1 if jobs_per_device is None else jobs_per_device
        if per_device < 1:
            raise ExperimentError(f"--jobs-per-device must be at least 1, got {per_device}")
        slots = len(devs) * per_device if devs else None
        if jobs is None:
            jobs = slots or 1
        if jobs < 1:
            raise ExperimentError(f"--jobs must be at least 1, got {jobs}")
        if slots is not None and jobs > slots:
            raise ExperimentError(f"--jobs {jobs} is more than the {slots} device slots of --devices {','.join(devs)} "
                                  f"--jobs-per-device {per_device}; raise --jobs-per-device or lower --jobs")
        threads = max(1, (cores or cpu_count()) // jobs) if jobs > 1 else None
        return cls(jobs, devs, threads)

    def device(self, slot: int) -> str | None:
        return self.devices[slot % len(self.devices)] if self.devices else None

    def env(self, slot: int) -> dict[str, str]:
        """The environment variables of a job in ``slot`` (on top of the runner's)."""
        env = {}
        device = self.device(slot)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def describe(self, slot: int) -> str:
        parts = [f"device {self.device(slot)}"] if self.devices else []
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return ", ".join(parts)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


@dataclass
class _Running:
    """A stage in flight: its process (the leader of its group), lock, log and progress echo."""

    st: Stage
    index: int
    slot: int
    proc: subprocess.Popen
    lock: FileLock
    log: IO[bytes] | None
    echo: Any
    t0: float = field(default_factory=time.time)
    epoch: tuple[int, int] = (0, 0)  # the last progress line's epoch k/n


class ParallelRun:
    """Runs the stages of ``protocol`` not done yet, up to ``slots.jobs`` at a time, in dependency order.

    Failure stops the other stages (as the sequential runner stops at its first failure) and raises; a
    signal to the runner (SIGTERM, SIGINT, SIGHUP) stops every stage's process group and raises
    :class:`~lit_prune.protocol.run.Interrupted`.
    """

    def __init__(self, protocol: Protocol, stages: Sequence[Stage], slots: Slots, verbose: bool = False) -> None:
        self.p, self.stages, self.slots, self.verbose = protocol, list(stages), slots, verbose
        self.needs = dependencies(protocol.config, self.stages)
        self.index = {st.label: i for i, st in enumerate(self.stages, 1)}
        self.done: set[str] = set()
        self.running: dict[str, _Running] = {}
        self.waiting: dict[str, float] = {}  # stage label -> since when its lock is held by an earlier runner's stage
        self.t_start = time.time()
        self.work_done = 0.0  # epoch-weighted work finished in this run (see _weight)

    # -- the loop
    def run(self) -> None:
        p = self.p
        pending = []
        for st in self.stages:
            if st.done():
                print(f"{self._head(st)}: done, skipped")
                self.done.add(st.label)
            else:
                pending.append(st)
        threads = self.slots.threads
        print(f"{len(pending)} stages to run, up to {self.slots.jobs} at a time"
              + (f" ({threads} CPU thread{'s' if threads > 1 else ''} each)" if threads else ""), flush=True)
        p._in_flight = {}
        try:
            while pending or self.running:
                if p._interrupted is not None:
                    labels = [r.st.label for r in self.running.values()]
                    self._stop_all()
                    raise Interrupted(p._interrupted, *labels)
                self._reap()
                for st in list(pending):
                    if len(self.running) >= self.slots.jobs:
                        break
                    if all(n in self.done for n in self.needs[st.label]) and self._launch(st):
                        pending.remove(st)
                for r in self.running.values():
                    self._echo(r)
                if pending and not self.running and not self.waiting and not self._startable(pending):
                    missing = {n for st in pending for n in self.needs[st.label] if n not in self.done}
                    raise ExperimentError(f"stages {sorted(missing)} are needed but not planned")  # a planner bug
                time.sleep(POLL)
        finally:
            self._stop_all()
            p._in_flight = None

    def _startable(self, pending: list[Stage]) -> bool:
        return any(all(n in self.done for n in self.needs[st.label]) for st in pending)

    def _head(self, st: Stage) -> str:
        return f"[{self.index[st.label]}/{len(self.stages)}] {st.label}"

    # -- starting a stage
    def _launch(self, st: Stage) -> bool:
        """Start ``st`` (or find it finished); False when its lock is still held by an earlier runner's stage."""
        p = self.p
        if p.planner.needs_budget(st):
            st = p.scratch_b(st).applied_to(st)
        st.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(p.layout.stage_lock(st.dir))
        holder = lock.try_acquire(holder_info(runner_pid=os.getpid(), stage=st.label))
        if holder is not None:
            if st.label not in self.waiting:
                self.waiting[st.label] = time.monotonic()
                print(p.waiting_message(st, holder), flush=True)
            if time.monotonic() - self.waiting[st.label] > run_module.STAGE_LOCK_WAIT:
                raise p.still_running(st, holder, lock.path)
            return False
        self.waiting.pop(st.label, None)
        try:
            if st.done():  # finished by the stage process of an earlier runner, waited for above
                print(f"{self._head(st)}: done, skipped")
                self.done.add(st.label)
                lock.release()
                return True
            if st.kind == PRUNE and not st.command:
                p._adopt_training_artifact(st)
                print(f"{self._head(st)}: {st.note}")
                self.done.add(st.label)
                lock.release()
                return True
            if st.kind != PRUNE:
                p._write_stage_yaml(st)
            slot = min(set(range(self.slots.jobs)) - {r.slot for r in self.running.values()})
            where = self.slots.describe(slot)
            epochs = f", {st.epochs} epochs" if st.epochs else ""
            note = f" ({st.note})" if st.note else ""
            print(f"{self._head(st)}{epochs}{note} ...{' [' + where + ']' if where else ''}", flush=True)
            log_path = p.layout.stage_log(st.dir)
            log = None if self.verbose else open(log_path, "ab")
            echo = None if self.verbose else _ProgressEcho(log_path, prefix=f"    {st.label}: ")
            proc = start_stage_process(st.command, stdout=log, stderr=None if log is None else subprocess.STDOUT,
                                       pass_fds=[lock.fd] if lock.fd is not None else [], env=self.slots.env(slot))
        except BaseException:
            lock.release()
            raise
        lock.update(holder_info(pid=proc.pid, runner_pid=os.getpid(), stage=st.label, command=st.command))
        self.running[st.label] = _Running(st, self.index[st.label], slot, proc, lock, log, echo)
        p._in_flight[st.label] = proc
        return True

    # -- stages that end
    def _reap(self) -> None:
        for label, r in list(self.running.items()):
            if r.proc.poll() is None:
                continue
            self._echo(r)
            self._end(r)
            st = r.st
            if r.proc.returncode != 0:
                self._stop_all()
                raise self.p.failed(st, r.proc.returncode, self.verbose)
            if not st.done():
                self._stop_all()
                raise self.p.unfinished(st)
            self.done.add(label)
            self.work_done += _weight(st)
            m = read_metrics(st.dir)
            acc = f", test acc1 {100 * m['acc1']:.2f}%" if m else ""
            print(f"{self._head(st)}: done in {time.time() - r.t0:.1f} s{acc}", flush=True)
            print(f"    {self._progress()}", flush=True)

    def _end(self, r: _Running) -> None:
        """Stop what is left of the stage's group (the ranks of a DDP stage), then free its lock and slot."""
        stopped = stop_group(r.proc, run_module.STOP_GRACE)
        if not stopped:
            print(f"warning: processes of stage '{r.st.label}' (group {r.proc.pid}) survived SIGKILL",
                  file=sys.stderr, flush=True)
        if r.log is not None:
            r.log.close()
        r.lock.release()
        self.running.pop(r.st.label, None)
        if self.p._in_flight is not None:
            self.p._in_flight.pop(r.st.label, None)

    def _stop_all(self) -> None:
        """Stop every running stage: SIGTERM to every group at once, then each one's end (SIGKILL after the
        grace period)."""
        for r in self.running.values():
            signal_group(r.proc.pid, signal.SIGTERM)
        for r in list(self.running.values()):
            self._end(r)

    # -- progress
    def _echo(self, r: _Running) -> None:
        if r.echo is None:
            return
        for line in r.echo.poll():
            found = _EPOCH.match(line)
            if found:
                r.epoch = (int(found[1]), int(found[2]))

    def _progress(self) -> str:
        """``5/12 stages done, 2 running; 3.1 min elapsed, ETA ~2.0 min`` (the ETA from the epoch-weighted work
        done so far in this run; Scratch-B counted at the large model's epochs until its budget is known)."""
        elapsed = time.time() - self.t_start
        partial = sum(_weight(r.st) * r.epoch[0] / r.epoch[1] for r in self.running.values() if r.epoch[1])
        left = sum(_weight(st) for st in self.stages if st.label not in self.done) - partial
        done = self.work_done + partial
        eta = f", ETA ~{minutes(elapsed * left / done)}" if done > 0 and left > 0 else ""
        return (f"progress: {len(self.done)}/{len(self.stages)} stages done, {len(self.running)} running; "
                f"{minutes(elapsed)} elapsed{eta}")


def _weight(st: Stage) -> float:
    """A stage's share of the work: its epochs plus one for its start (loading, testing); a prune stage 1."""
    epochs = st.epochs if st.epochs is not None else 0
    return 1.0 + max(epochs, 0)
