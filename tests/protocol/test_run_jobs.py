"""Stages side by side (``python -m lit_prune.rethink ... --jobs N``, ``lit_prune.protocol.executor``): the
dependencies, device slots and threads per job, and the guarantees of the sequential runner with several
stages in flight (signals, kill -9 and resume, failure).

The runner runs as a real process (``tests/protocol/fake_jobs_runner.py``: the real runner and CLI, every stage's
command replaced by ``tests/protocol/fake_job.py``, which records its start, environment and end, sleeps and
writes what the real stage writes): no torch in the stages. The slow test at the end runs real stages.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_prune.protocol import ExperimentError, Planner, RunLayout, load_experiment
from lit_prune.protocol.executor import Slots, cpu_count, dependencies
from lit_prune.protocol.lock import FileLock, group_members
from tests.helpers import clean_env, run_process
from tests.protocol.test_lock import RunnerProcesses, alive, wait_for

REPO = Path(__file__).resolve().parents[2]
FAKE_RUNNER = Path(__file__).with_name("fake_jobs_runner.py")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")


def write_experiment(path: Path, **overrides) -> Path:
    exp = {"name": "jobs", "base": str(REPO / "configs" / "quickstart.yaml"), "seeds": [0, 1],
           "args": ["--trainer.max_epochs=2"],
           "variants": [{"name": "l1", "method": str(REPO / "configs" / "methods" / "l1_quickstart.yaml")}],
           "regimes": {"finetune": {"args": ["--trainer.max_epochs=1"]}, "scratch_e": {}, "scratch_b": {}}}
    exp.update(overrides)
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real artifact (half the widths of the quickstart VGG-11) that every fake prune stage copies."""
    from lit_prune.artifact import make_artifact, save_artifact
    from lit_prune.methods.state import Counts
    from lit_prune.models import create_model

    large = create_model("cifar_vgg11", cfg=[16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128])
    pruned = create_model("cifar_vgg11", cfg=[8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64])
    return save_artifact(make_artifact(pruned, method="test", dense=Counts.of(large)),
                         tmp_path_factory.mktemp("art") / "a.pt")


class FakeRuns(RunnerProcesses):
    """Fake runners of fake jobs (``fake_jobs_runner.py``) on one experiment directory."""

    def __init__(self, tmp_path: Path, artifact: Path) -> None:
        super().__init__(tmp_path, FAKE_RUNNER)
        self.artifact = artifact
        self.config = write_experiment(tmp_path / "exp.yaml")

    def start(self, *args: str, seconds: float = 0.6, **env: str) -> subprocess.Popen:
        extra = {"FAKE_ARTIFACT": str(self.artifact), "FAKE_SECONDS": str(seconds), **env}
        return self.spawn(["--config", str(self.config), *args], extra)

    def events(self) -> list[dict]:
        path = self.out / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def starts(self) -> list[dict]:
        return [e for e in self.events() if e["event"] == "start"]

    def stage_processes(self) -> list[int]:
        return [e["pid"] for e in self.starts()]


@pytest.fixture
def runs(tmp_path: Path, artifact: Path):
    r = FakeRuns(tmp_path, artifact)
    try:
        yield r
    finally:
        r.cleanup()


def stage_key(out: Path, stage: str) -> str:
    """``seed0/large``, ``seed1/l1/prune``: a stage folder relative to the experiment directory."""
    return str(Path(stage).relative_to(out))


def intervals(events: list[dict], out: Path) -> dict[str, tuple[float, float, dict]]:
    """stage -> (start, end, start event) of the stages that ran to their end."""
    starts = {stage_key(out, e["stage"]): e for e in events if e["event"] == "start"}
    ends = {stage_key(out, e["stage"]): e["t"] for e in events if e["event"] == "end"}
    return {k: (starts[k]["t"], ends[k], starts[k]) for k in ends}


# ---- the plan's dependencies and the slots ------------------------------------------------------------

def test_each_stage_needs_exactly_the_stages_whose_files_it_reads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    config = load_experiment(write_experiment(
        tmp_path / "exp.yaml", seeds=[0, 1], regimes={"finetune": {}, "scratch_b": {}, "rewind": {"regime": "rewind"}},
        variants=[{"name": "A", "method": "configs/methods/l1_quickstart.yaml"},
                  {"name": "B", "method": "configs/methods/l1_quickstart.yaml", "source": {"variant": "A",
                                                                                         "regime": "rewind"}}]))
    stages = Planner(config, RunLayout(tmp_path / "out")).stages()
    needs = dependencies(config, stages)
    assert set(needs) == {st.label for st in stages}
    for seed in (0, 1):
        assert needs[f"seed {seed} | large"] == ()
        assert needs[f"seed {seed} | A | prune"] == (f"seed {seed} | large",)
        # iterative pruning: the source variant's retrained model, of the same seed
        assert needs[f"seed {seed} | B | prune"] == (f"seed {seed} | A | rewind",)
        for v in ("A", "B"):
            for kind in ("pruned", "finetune", "scratch_b", "rewind"):
                assert needs[f"seed {seed} | {v} | {kind}"] == (f"seed {seed} | {v} | prune",)
    # a predefined architecture is built, not pruned: it needs no large model
    predefined = load_experiment(write_experiment(tmp_path / "p.yaml", seeds=[0], regimes={"scratch_e": {}},
                                                  variants=[{"name": "A", "width_config": "A"}]))
    assert dependencies(predefined, Planner(predefined, RunLayout(tmp_path / "p")).stages())["seed 0 | A | prune"] == ()
    # Section 5's controls copy the method's artifact: uniform and random widths need its prune stage too
    search = load_experiment("configs/experiments/quickstart_search.yaml")
    needs = dependencies(search, Planner(search, RunLayout(tmp_path / "s")).stages())
    for control in ("uniform", "random"):
        assert set(needs[f"seed 1 | {control}_ratio0.7 | prune"]) == {"seed 1 | slim_ratio0.7 | prune",
                                                                      "seed 1 | large"}


def test_device_slots_spread_the_jobs_and_share_the_cores() -> None:
    slots = Slots.plan(None, "0,1,2,3", 2, cores=16)
    assert slots.jobs == 8 and slots.threads == 2
    assert [slots.env(i)["CUDA_VISIBLE_DEVICES"] for i in range(8)] == ["0", "1", "2", "3"] * 2
    assert slots.env(5)["OMP_NUM_THREADS"] == slots.env(5)["MKL_NUM_THREADS"] == "2"
    three = Slots.plan(3, "4,6", 2, cores=16)  # fewer jobs than slots: still spread over the devices
    assert [three.env(i)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4", "6", "4"] and three.threads == 5
    assert Slots.plan(4, cores=2).threads == 1 and "CUDA_VISIBLE_DEVICES" not in Slots.plan(4, cores=2).env(0)
    assert Slots.plan().env(0) == {}  # one job: today's environment, untouched
    for args, message in [((0,), "--jobs must be at least 1"), ((None, None, 2), "needs --devices"),
                          ((5, "0,1", 2), "more than the 4 device slots"), ((None, "0,,1"), "device indices"),
                          ((None, "0,0"), "lists a device twice"), ((None, "0", 0), "at least 1")]:
        with pytest.raises(ExperimentError, match=message):
            Slots.plan(*args)


# ---- a run with several jobs ----------------------------------------------------------------------

def test_jobs_run_side_by_side_in_dependency_order_on_their_device_slots(runs: FakeRuns) -> None:
    rc, out, err = runs.finish(runs.start("--jobs", "3", "--devices", "0,1", "--jobs-per-device", "2"))
    assert rc == 0, out + err
    ran = intervals(runs.events(), runs.out)
    assert len(ran) == 12 and len(runs.starts()) == 12  # each stage once
    for key, (start, _, _) in ran.items():
        parts = key.split("/")
        need = [] if parts[1] == "large" else [f"{parts[0]}/large"] if parts[2] == "prune" else [f"{parts[0]}/l1/prune"]
        for n in need:
            assert start >= ran[n][1], f"{key} started before {n} ended"
    # never more than 3 jobs, never more than 2 on one device; the two seeds' large models side by side
    times = sorted({t for s, e, _ in ran.values() for t in (s, e)})
    for t in times:
        live = [ev for s, e, ev in ran.values() if s <= t < e]
        assert len(live) <= 3
        for dev in ("0", "1"):
            assert sum(ev["env"]["CUDA_VISIBLE_DEVICES"] == dev for ev in live) <= 2
    (s0, e0, _), (s1, e1, _) = ran["seed0/large"], ran["seed1/large"]
    assert s1 < e0 and s0 < e1
    threads = str(max(1, cpu_count() // 3))
    for _, _, ev in ran.values():
        assert ev["env"]["CUDA_VISIBLE_DEVICES"] in ("0", "1")
        assert ev["env"]["OMP_NUM_THREADS"] == ev["env"]["MKL_NUM_THREADS"] == threads
    # Scratch-B's budget, read from the artifact once it exists
    r = json.loads(json.dumps(torch.load(runs.artifact, weights_only=True)["flops"]))
    ratio = r["dense"]["macs"] / r["pruned"]["macs"]
    assert f"--trainer.max_epochs={int(2 * ratio)}" in ran["seed1/l1/scratch_b"][2]["args"]
    # one progress line per running stage, after its label, and the whole protocol's progress
    assert "    seed 1 | l1 | scratch_e: epoch 2/2 | train/loss 0.5 | fake" in out
    assert "progress: 12/12 stages done, 0 running" in out and "ETA ~" in out


@linux_only
def test_sigterm_stops_every_stage_in_flight(runs: FakeRuns) -> None:
    runner = runs.start("--jobs", "3", seconds=60)
    wait_for(lambda: len(runs.starts()) == 2, 60, "the two large stages' start")
    runner.send_signal(signal.SIGTERM)
    rc, _, err = runs.finish(runner)
    assert rc == 2 and err.strip() == ("error: interrupted by SIGTERM during stages 'seed 0 | large', 'seed 1 | large' "
                                       "(their processes were stopped); run the same command again to resume"), err
    for e in runs.starts():
        assert not alive(e["pid"]) and not group_members(e["pid"])
    for path in (runs.out / ".lock", runs.out / "seed0" / "large" / ".lock", runs.out / "seed1" / "large" / ".lock"):
        lock = FileLock(path)
        assert lock.try_acquire({}) is None, path
        lock.release()


@linux_only
def test_kill_9_with_stages_in_flight_then_a_restart_finishes_every_stage_once(runs: FakeRuns) -> None:
    write_experiment(runs.config, regimes={"scratch_e": {}})  # 8 stages
    runner = runs.start("--jobs", "3", seconds=60)
    wait_for(lambda: len(runs.starts()) == 2, 60, "the two large stages' start")
    orphans = [e["pid"] for e in runs.starts()]
    runner.kill()
    runner.wait(10)
    wait_for(lambda: not any(map(alive, orphans)), 10, "the orphaned stages' end (parent-death signal)")
    rc, out, err = runs.finish(runs.start("--jobs", "3", seconds=0.2))
    assert rc == 0, out + err
    starts = [stage_key(runs.out, e["stage"]) for e in runs.starts()]
    assert sorted(starts.count(k) for k in set(starts)) == [1] * 6 + [2] * 2  # the killed large models again
    assert len(intervals(runs.events(), runs.out)) == 8


@pytest.mark.slow  # ~4 s: two runner processes
@linux_only
def test_a_failed_stage_stops_the_others_and_is_named(runs: FakeRuns) -> None:
    rc, out, err = runs.finish(runs.start("--jobs", "3", FAKE_FAIL="large"))
    assert rc == 2, out + err
    failed = [s for s in (0, 1) if f"error: stage 'seed {s} | large' failed (exit 3)" in err]
    assert len(failed) == 1 and "fake failure" in err and "Traceback" not in err, err
    assert len(runs.starts()) == 2  # nothing started after the failure
    for e in runs.starts():
        assert not alive(e["pid"])


# ---- real stages: kill -9 with two jobs in flight, resumed, equals a sequential run ---------------

@pytest.mark.slow  # ~3 min on 2 busy cores: real stage processes, each importing torch and Lightning
def test_killed_runner_with_two_jobs_in_flight_resumes_to_the_sequential_results(tmp_path: Path) -> None:
    args = ["--trainer.max_epochs=3", "--trainer.limit_train_batches=30", "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=4", "--data.batch_size=16", "--trainer.deterministic=true",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    config = write_experiment(tmp_path / "exp.yaml", name="resume", seeds=[0], args=args,
                              regimes={"scratch_e": {}, "finetune": {"args": ["--model.lr=0.01"]}})
    command = [sys.executable, "-m", "lit_prune.rethink", "--config", str(config), "--out"]
    reference = tmp_path / "sequential"
    run_process([*command, str(reference)], tmp_path, clean_env(), 600)

    out = tmp_path / "killed"
    lasts = [out / "seed0" / "l1" / r / "checkpoints" / "last.ckpt" for r in ("scratch_e", "finetune")]
    proc = subprocess.Popen([*command, str(out), "--jobs", "2"], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 500
    try:
        while not any(p.is_file() for p in lasts):
            assert proc.poll() is None, "the runner ended before a regime wrote a checkpoint"
            assert time.monotonic() < deadline, "no regime wrote a checkpoint in time"
            time.sleep(0.02)
    finally:
        proc.kill()  # the runner only: its stages get the parent-death signal
        proc.wait()
    assert not any((p.parent.parent / "metrics.json").exists() for p in lasts), "a regime finished before the kill"
    run_process([*command, str(out), "--jobs", "2"], tmp_path, clean_env(), 600)
    for stage in ("large", "l1/pruned", "l1/scratch_e", "l1/finetune"):
        m, ref = (json.loads((d / "seed0" / stage / "metrics.json").read_text()) for d in (out, reference))
        assert {k: m[k] for k in ("acc1", "loss", "epochs")} == {k: ref[k] for k in ("acc1", "loss", "epochs")}, stage
        w, ref_w = (torch.load(d / "seed0" / stage / "model.pt", weights_only=True)["state_dict"]
                    for d in (out, reference))
        assert all(torch.equal(w[k], v) for k, v in ref_w.items()), f"{stage}: weights differ after the resume"
