"""Stages as cluster jobs (``python -m lit_prune.rethink ... --executor slurm``), through submitit.

    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --out runs/r56 --executor slurm \\
        --slurm-partition gpu --slurm-time 720 --slurm-account myproj --slurm-param qos=high
    python -m lit_prune.rethink --config ... --out runs/r56 --executor slurm   # again: collect, submit the rest
    python -m lit_prune.rethink --config ... --out runs/r56 --cancel            # cancel every recorded job

- Each stage's command (the one ``--dry-run`` prints) is one job. A stage whose needed stages are not done is
  submitted with ``--dependency=afterok:<their job ids>``; Scratch-B's epochs come from its artifact, so it is
  submitted by the runner that finds its prune stage done (a runner polls until everything is done; with
  ``--no-wait`` it submits what it can and exits, and a later run continues).
- A job is one DDP run over ``--trainer.devices`` x ``--trainer.num_nodes`` (read from the stage's resolved
  config): ``nodes = num_nodes``, ``tasks_per_node = gpus_per_node = devices`` (no GPUs with
  ``trainer.accelerator: cpu``); every task runs the stage's command, and Lightning's SLURM environment makes
  the tasks the ranks of one run. A prune stage is one task.
- Results are read from the stages' ``metrics.json`` and artifacts, never from submitit's pickled job
  results: a stage is done when its files are. A job that ended without its stage done (failed, timed out,
  cancelled) stops the runner with its log; the next run submits the stage again, and it resumes from its
  last checkpoint.
- The job ids are recorded in ``<out>/jobs.json`` (written atomically); submitit's files (the job's
  submission, its per-task logs) are in ``<out>/submitit/``, rank 0's output in the stage's ``stage.log``.
- ``--executor submitit-local``: the same path with submitit's local executor (jobs are processes of this
  machine, one task each, Lightning's own launcher for several devices). It has no job dependencies, so a
  stage is submitted once the stages it needs are done; ``--jobs N`` caps the jobs running at once.

Cluster options: ``--slurm-partition``, ``--slurm-time`` (minutes; default 1440), ``--slurm-account`` and any
other of submitit's Slurm parameters as ``--slurm-param KEY=VALUE`` (``qos=high``, ``constraint=a100``,
``cpus_per_task=8``, ``mem_gb=64``, ``exclude=node3``, ``setup=["module load cuda"]``: values are YAML).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lit_prune.protocol.config import _MISSING, ExperimentError, _lookup, _options
from lit_prune.protocol.executor import dependencies
from lit_prune.protocol.layout import PRUNE
from lit_prune.protocol.lock import start_stage_process, stop_group
from lit_prune.protocol.plan import Stage
from lit_prune.protocol.run import _ProgressEcho

if TYPE_CHECKING:
    from lit_prune.protocol.run import Protocol

EXECUTORS = {"slurm": "slurm", "submitit-local": "local"}  # --executor -> submitit's cluster name
JOBS = "jobs.json"  # the record of submitted jobs, in the experiment directory
#: seconds between two looks at the jobs (submitit's watcher batches the sacct calls)
POLL = 5.0
DEFAULT_TIME = 1440  # minutes; submitit's own default (5) would end every real stage


@dataclass(frozen=True)
class ClusterOptions:
    """What ``--slurm-*`` and ``--executor`` say: the submitit cluster and the jobs' parameters."""

    executor: str = "slurm"
    partition: str | None = None
    time: int = DEFAULT_TIME
    account: str | None = None
    params: Mapping[str, Any] | None = None  # other slurm_* parameters of submitit
    max_active: int | None = None  # submitit-local: jobs at once

    @property
    def cluster(self) -> str:
        return EXECUTORS[self.executor]

    @staticmethod
    def parse_params(items: Sequence[str]) -> dict[str, Any]:
        """``["qos=high", "cpus_per_task=8"]`` -> ``{"qos": "high", "cpus_per_task": 8}``.

        Raises:
            ExperimentError: an item without ``=``.
        """
        params = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ExperimentError(f"--slurm-param takes KEY=VALUE (a submitit Slurm parameter, e.g. qos=high), "
                                      f"got {item!r}")
            params[key.strip().removeprefix("slurm_")] = yaml.safe_load(value)
        return params


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ExperimentError("--executor slurm needs submitit: pip install 'lit-prune[slurm]' (or pip install "
                              "submitit)") from None
    return submitit


# ---- what a job runs --------------------------------------------------------------------------------------

class StageJob:
    """The function a job runs on each of its tasks (submitit pickles it by reference to this class): the
    stage's command as its own process group, global rank 0's output appended to the stage's log (the other
    tasks' output goes to submitit's per-task logs). Returns nothing worth reading: the stage writes its files.

    Raises:
        RuntimeError: the command failed (the job then ends FAILED).
    """

    def __init__(self, command: Sequence[str], log: str) -> None:
        self.command, self.log = list(command), log

    def __call__(self) -> None:
        rank = int(os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0")))
        log = open(self.log, "ab") if rank == 0 else None
        proc = start_stage_process(self.command, stdout=log, stderr=None if log is None else subprocess.STDOUT)
        try:
            rc = proc.wait()
        finally:  # cancelled (SIGINT from submitit's local controller, scancel): the stage's group ends too
            stop_group(proc, 10.0)
            if log is not None:
                log.close()
        if rc != 0:
            raise RuntimeError(f"the stage exited with {rc}; log: {self.log}")


# ---- resources of a stage ---------------------------------------------------------------------------------

def trainer_settings(command: Sequence[str], docs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``trainer.devices``, ``trainer.num_nodes`` and ``trainer.accelerator`` of a stage's command, resolved as
    LightningCLI does (each ``--config`` file in order, then explicit flags; the last one wins)."""
    keys = ("devices", "num_nodes", "accelerator")
    found: dict[str, Any] = {}
    for name, value in _options(list(command)):
        if name in ("--config", "-c") and value is not None:
            doc = docs.get(value)
            if doc is None and Path(value).is_file():
                doc = yaml.safe_load(Path(value).read_text()) or {}
            for key in keys:
                v = _lookup(doc or {}, ("trainer", key))
                if v is not _MISSING:
                    found[key] = v
        elif name in (f"--trainer.{k}" for k in keys) and value is not None:
            found[name.split(".", 1)[1]] = yaml.safe_load(value)
    return found


def _count(value: Any, what: str, st: Stage) -> int:
    if value is None:
        return 1
    if isinstance(value, bool):
        raise ExperimentError(f"stage '{st.label}': trainer.{what} {value!r} is not a count")
    if isinstance(value, int) and value >= 1:
        return value
    if isinstance(value, (list, tuple)) and value:
        return len(value)
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\d+(,\d+)*,?", value):
        return len([v for v in value.split(",") if v])
    raise ExperimentError(f"stage '{st.label}': a cluster job needs trainer.{what} as a number of devices (the tasks "
                          f"and GPUs it asks for), got {value!r}; set e.g. args: [--trainer.{what}=4]")


def job_resources(st: Stage, docs: Mapping[str, Mapping[str, Any]], cluster: str) -> dict[str, int]:
    """submitit's ``nodes``, ``tasks_per_node`` and ``gpus_per_node`` of the stage's job."""
    settings = trainer_settings(st.command, docs)
    gpu = str(settings.get("accelerator", "auto")).lower() not in ("cpu",)
    if st.kind == PRUNE:
        return {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": int(gpu)}
    devices = _count(settings.get("devices"), "devices", st) if settings.get("devices") not in ("auto", -1) else None
    if devices is None:
        if cluster == "slurm":
            raise ExperimentError(f"stage '{st.label}': a cluster job needs trainer.devices as a number (the tasks "
                                  f"and GPUs it asks for), got {settings.get('devices')!r}; set e.g. "
                                  "args: [--trainer.devices=4]")
        devices = 1
    nodes = _count(settings.get("num_nodes"), "num_nodes", st)
    if cluster == "local":  # one task: Lightning's own launcher starts the ranks; one machine
        if nodes > 1:
            raise ExperimentError(f"stage '{st.label}': the local executor runs on one machine, the stage asks for "
                                  f"trainer.num_nodes={nodes}")
        return {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": devices if gpu else 0}
    return {"nodes": nodes, "tasks_per_node": devices, "gpus_per_node": devices if gpu else 0}


def shape(resources: Mapping[str, int]) -> str:
    """``2 node(s) x 4 task(s), 4 GPU(s) per node``"""
    return (f"{resources['nodes']} node(s) x {resources['tasks_per_node']} task(s), {resources['gpus_per_node']} "
            "GPU(s) per node")


# ---- the jobs of an experiment ------------------------------------------------------------------------------

class JobRecord:
    """``<out>/jobs.json``: the job of every submitted stage, ``{label: {"job_id", "submitted", "after", ...}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"executor": None, "folder": None, "jobs": {}}
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())  # JSON is YAML
            except yaml.YAMLError:
                data = None
            if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict):
                raise ExperimentError(f"{path} is not a job record (it does not read back); cancel its jobs by hand "
                                      "if any still run, delete it and run again")
            self.data = data

    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.data["jobs"]

    def add(self, label: str, entry: dict[str, Any]) -> None:
        self.jobs[label] = entry
        self.save()

    def save(self) -> None:
        from lit_prune.io import atomic_save_json

        atomic_save_json(self.data, self.path)


class Jobs:
    """Submits, watches and cancels the jobs of one executor (``slurm`` or ``local``)."""

    def __init__(self, options: ClusterOptions, folder: Path) -> None:
        self.options, self.folder, self.cluster = options, folder, options.cluster
        self._local: dict[str, Any] = {}  # job id -> the submitit job this runner submitted (local: its process)

    def executor(self, name: str, resources: Mapping[str, int], after: Sequence[str]) -> Any:
        submitit = _submitit()
        try:
            ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        except RuntimeError as err:  # no srun: not on a Slurm cluster's login node
            raise ExperimentError(f"--executor {self.options.executor}: {err}; submit from a machine of the cluster "
                                  "(or try the launch here with --executor submitit-local)") from None
        o = self.options
        params: dict[str, Any] = {"name": name, "timeout_min": int(o.time), **resources}
        if self.cluster == "slurm":
            params.update({f"slurm_{k}": v for k, v in {"partition": o.partition, "account": o.account,
                                                        **(o.params or {})}.items() if v is not None})
            if after:
                params["slurm_dependency"] = "afterok:" + ":".join(after)
        try:
            ex.update_parameters(**params)
        except (NameError, ValueError, AssertionError) as err:
            raise ExperimentError(f"submitit refused the job's parameters {params}: {err}") from None
        return ex

    def submit(self, st: Stage, name: str, resources: Mapping[str, int], after: Sequence[str], log: Path) -> str:
        job = self.executor(name, resources, after).submit(StageJob(st.command, str(log)))
        self._local[job.job_id] = job
        return str(job.job_id)

    def active(self, job_id: str) -> bool:
        """The job is queued or running (a job id of this executor, possibly submitted by an earlier runner)."""
        if self.cluster == "local":
            job = self._local.get(job_id)
            return not job.done() if job is not None else _local_controller_alive(job_id)
        submitit = _submitit()
        return not submitit.SlurmJob(folder=self.folder / "%j", job_id=job_id).done()

    def state(self, job_id: str) -> str:
        if self.cluster == "local":
            job = self._local.get(job_id)
            return job.state if job is not None else "RUNNING" if _local_controller_alive(job_id) else "ENDED"
        return _submitit().SlurmJob(folder=self.folder / "%j", job_id=job_id).state

    def cancel(self, job_id: str) -> None:
        if self.cluster == "local":
            job = self._local.get(job_id)
            if job is not None:
                job.cancel()
            elif _local_controller_alive(job_id):
                os.kill(int(job_id), 2)  # SIGINT: submitit's local controller stops its tasks
            return
        subprocess.run(["scancel", job_id], check=False)


def _local_controller_alive(job_id: str) -> bool:
    """submitit's local job id is its controller's pid: alive (not a zombie) and still a submitit process."""
    try:
        stat = Path(f"/proc/{job_id}/stat").read_text()
        cmdline = Path(f"/proc/{job_id}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return stat[stat.rfind(")") + 2] not in "ZX" and b"submitit" in cmdline


class SubmititRun:
    """Submits the stages of ``protocol`` as jobs, records them, and collects them until every stage is done."""

    def __init__(self, protocol: Protocol, stages: Sequence[Stage], options: ClusterOptions) -> None:
        self.p, self.stages, self.options = protocol, list(stages), options
        self.needs = dependencies(protocol.config, self.stages)
        self.index = {st.label: i for i, st in enumerate(self.stages, 1)}
        self.record = JobRecord(protocol.out / JOBS)
        self.jobs = Jobs(options, protocol.out / "submitit")
        self.seen_active: set[str] = set()  # job ids this runner saw queued or running
        self.echoes: dict[str, _ProgressEcho] = {}  # stage label -> the echo of its log's progress lines

    def _head(self, st: Stage) -> str:
        return f"[{self.index[st.label]}/{len(self.stages)}] {st.label}"

    def _check_executor(self) -> None:
        old = self.record.data.get("executor")
        if old and old != self.options.executor:
            running = [label for label, j in self.record.jobs.items() if Jobs(
                ClusterOptions(old), self.p.out / "submitit").active(j["job_id"])]
            if running:
                raise ExperimentError(f"{self.record.path}: jobs of --executor {old} still run ({', '.join(running)}); "
                                      f"wait for them or cancel them (--cancel --executor {old}) before switching")
        self.record.data.update(executor=self.options.executor, folder=str(self.p.out / "submitit"))

    def run(self, wait: bool = True) -> bool:
        """Submit what can be submitted, then (``wait``) collect until every stage is done. True when done."""
        self._check_executor()
        done: set[str] = set()
        reported: set[str] = set()
        while True:
            active = 0
            for st in self.stages:
                if st.label in done:
                    continue
                entry = self.record.jobs.get(st.label)
                if st.label in self.echoes:  # the last progress lines before the stage's end
                    self.echoes[st.label].poll()
                if st.done():
                    done.add(st.label)
                    job = f" (job {entry['job_id']})" if entry else ""
                    print(f"{self._head(st)}: done{job}" if entry else f"{self._head(st)}: done, skipped", flush=True)
                    continue
                if entry is not None and self.jobs.active(entry["job_id"]):
                    self.seen_active.add(entry["job_id"])
                    active += 1
                    if st.label not in reported:
                        reported.add(st.label)
                        print(f"{self._head(st)}: job {entry['job_id']} queued or running", flush=True)
                    if st.label not in self.echoes:
                        self.echoes[st.label] = _ProgressEcho(self.p.layout.stage_log(st.dir),
                                                              prefix=f"    {st.label}: ")
                    continue
                if entry is not None and entry["job_id"] in self.seen_active:
                    raise self._ended(st, entry)
                if self._submit_if_ready(st, done):
                    active += 1
                    reported.add(st.label)
            if len(done) == len(self.stages):
                return True
            if not wait:
                print(f"{len(done)}/{len(self.stages)} stages done, {active} jobs queued or running; run the same "
                      "command again to collect them and submit the rest", flush=True)
                return False
            if active == 0:
                waiting = [st.label for st in self.stages if st.label not in done]
                raise ExperimentError(f"no job is queued or running, yet stages {waiting} are not done")
            time.sleep(POLL if self.options.cluster == "slurm" else min(POLL, 0.5))

    def _submit_if_ready(self, st: Stage, done: set[str]) -> bool:
        """Submit ``st`` if what it needs is done, or (Slurm) has a job to depend on; True if submitted."""
        after = []
        for need in self.needs[st.label]:
            if need in done:
                continue
            entry = self.record.jobs.get(need)
            if self.options.cluster != "slurm" or entry is None or entry["job_id"] not in self.seen_active:
                return False
            after.append(entry["job_id"])
        if self.p.planner.needs_budget(st):
            if after or not self.p.planner.budget_known(st):
                return False  # Scratch-B's epochs: once the artifact exists
            st = self.p.scratch_b(st).applied_to(st)
        if st.kind == PRUNE and not st.command:  # SFP's artifact, written by the large run: adopted here
            if after:
                return False
            self.p._adopt_training_artifact(st)
            print(f"{self._head(st)}: {st.note}", flush=True)
            return False
        if self.options.max_active is not None and self._running() >= self.options.max_active:
            return False
        st.dir.mkdir(parents=True, exist_ok=True)
        if st.kind != PRUNE:
            self.p._write_stage_yaml(st)
        resources = job_resources(st, self.p.config.docs, self.options.cluster)
        log = self.p.layout.stage_log(st.dir)
        self.echoes[st.label] = _ProgressEcho(log, prefix=f"    {st.label}: ")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.p.config.name}.{st.label}")
        job_id = self.jobs.submit(st, name, resources, after, log)
        self.seen_active.add(job_id)
        self.record.add(st.label, {"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "after": after, "resources": resources, "command": st.command})
        print(f"{self._head(st)}: submitted job {job_id} ({shape(resources)}"
              f"{', after ' + ' '.join(after) if after else ''})", flush=True)
        return True

    def _running(self) -> int:
        return sum(self.jobs.active(e["job_id"]) for e in self.record.jobs.values())

    def _ended(self, st: Stage, entry: Mapping[str, Any]) -> ExperimentError:
        """A job this runner watched ended without its stage done: its dependents are cancelled (they would wait
        for ever), and the message names its log."""
        state = self.jobs.state(entry["job_id"])
        dependents = [label for label, e in self.record.jobs.items() if entry["job_id"] in e.get("after", [])
                      and self.jobs.active(e["job_id"])]
        for label in dependents:
            self.jobs.cancel(self.record.jobs[label]["job_id"])
        log = self.p.layout.stage_log(st.dir)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.is_file() else ""
        cancelled = f"; its dependent jobs were cancelled ({', '.join(dependents)})" if dependents else ""
        return ExperimentError(f"stage '{st.label}': job {entry['job_id']} ended ({state}) without finishing"
                               f"{cancelled}; log: {log} (submitit's: {self.jobs.folder / entry['job_id']})\n"
                               f"{tail}\n"
                               "run the same command again to submit it again (it resumes from its last checkpoint)")


def cancel(protocol: Protocol, options: ClusterOptions) -> list[str]:
    """Cancel every recorded job still queued or running; returns their labels."""
    record = JobRecord(protocol.out / JOBS)
    executor = record.data.get("executor") or options.executor
    jobs = Jobs(replace(options, executor=executor), protocol.out / "submitit")
    cancelled = []
    for label, entry in record.jobs.items():
        if jobs.active(entry["job_id"]):
            jobs.cancel(entry["job_id"])
            cancelled.append(label)
            print(f"cancelled job {entry['job_id']} ({label})", flush=True)
    if not cancelled:
        print(f"no recorded job of {protocol.out} is queued or running", flush=True)
    return cancelled


def dry_run_note(protocol: Protocol, stages: Sequence[Stage], options: ClusterOptions) -> None:
    """What ``--dry-run`` adds with a cluster executor: each job's shape and what it waits for."""
    needs = dependencies(protocol.config, stages)
    print(f"\n--executor {options.executor}: one job per stage")
    for st in stages:
        if not st.command:
            continue
        try:
            r = job_resources(st, protocol.config.docs, options.cluster)
        except ExperimentError as err:
            print(f"    {st.label}: {err}", file=sys.stderr)
            continue
        after = f", after {', '.join(needs[st.label])}" if needs[st.label] else ""
        print(f"    {st.label}: {shape(r)}{after}")
