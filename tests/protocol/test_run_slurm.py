"""Stages as cluster jobs (``--executor slurm``, ``lit_prune.protocol.slurm``), through submitit.

The same code path runs here with submitit's local executor (``--executor submitit-local``: jobs are local
processes) and the fake stages of ``tests/protocol/fake_jobs_runner.py``; the Slurm submission itself (sbatch
files, afterok dependencies, DDP shape, cancel) runs against fake ``sbatch``/``sacct``/``scancel`` commands
that record what they are given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from lit_prune.protocol import ExperimentError, Stage
from lit_prune.protocol.slurm import ClusterOptions, job_resources
from tests.protocol.test_lock import alive, wait_for
from tests.protocol.test_run_jobs import FakeRuns, artifact, intervals, stage_key, write_experiment  # noqa: F401

pytest.importorskip("submitit")

# sbatch: keeps the batch file, answers with a job id; sacct: every job asked about is PENDING; scancel: records
FAKE_SLURM = {
    "sbatch": 'd=$(dirname "$0"); n=$(( $(cat "$d/count" 2>/dev/null || echo 100) + 1 )); echo $n > "$d/count"\n'
              'cp "$1" "$d/job$n.sh"; echo "Submitted batch job $n"\n',
    "sacct": 'echo "JobID|State|NodeList"\n'
             'while [ $# -gt 0 ]; do if [ "$1" = "-j" ]; then echo "$2|PENDING|None"; shift; fi; shift; done\n',
    "scancel": 'echo "$@" >> "$(dirname "$0")/cancelled"\n',
    "srun": "exit 1\n",  # submitit looks for it; nothing runs here
}


@pytest.fixture
def runs(tmp_path: Path, artifact: Path):  # noqa: F811
    r = FakeRuns(tmp_path, artifact)
    try:
        yield r
    finally:
        r.cleanup()


def test_a_job_is_one_ddp_run_over_devices_x_nodes() -> None:
    def stage(*args: str, kind: str = "scratch_e") -> Stage:
        return Stage(0, "A", kind, Path("x"), command=["python", "-m", "lit_prune.stage", *args])

    docs = {"base.yaml": {"trainer": {"devices": 2, "accelerator": "gpu"}}}
    ddp = stage("--config=base.yaml", "--trainer.devices=4", "--trainer.num_nodes=2")
    assert job_resources(ddp, docs, "slurm") == {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}
    assert job_resources(stage("--config=base.yaml"), docs, "slurm") == {"nodes": 1, "tasks_per_node": 2,
                                                                         "gpus_per_node": 2}
    cpu = stage("--config=base.yaml", "--trainer.accelerator=cpu", "--trainer.devices=[0,1,2]")
    assert job_resources(cpu, docs, "slurm") == {"nodes": 1, "tasks_per_node": 3, "gpus_per_node": 0}
    # the local executor: one task, Lightning's own launcher starts the ranks
    assert job_resources(stage("--config=base.yaml", "--trainer.devices=4"), docs, "local") == {
        "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 4}
    assert job_resources(stage("--config=base.yaml", kind="prune"), docs, "slurm")["tasks_per_node"] == 1
    with pytest.raises(ExperimentError, match="trainer.devices as a number"):
        job_resources(stage("--trainer.devices=auto"), docs, "slurm")
    with pytest.raises(ExperimentError, match="one machine"):
        job_resources(ddp, docs, "local")
    assert ClusterOptions.parse_params(["qos=high", "slurm_cpus_per_task=8"]) == {"qos": "high", "cpus_per_task": 8}
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        ClusterOptions.parse_params(["qos"])


def test_slurm_jobs_are_submitted_with_afterok_dependencies_and_cancelled(runs: FakeRuns) -> None:
    bin_dir = runs.tmp / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    write_experiment(runs.config, args=["--trainer.max_epochs=2", "--trainer.accelerator=gpu", "--trainer.devices=4",
                                        "--trainer.num_nodes=2"])
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    rc, out, err = runs.finish(runs.start("--executor", "slurm", "--no-wait", "--slurm-partition", "gpu",
                                          "--slurm-time", "30", "--slurm-param", "qos=high", PATH=path))
    assert rc == 0, out + err
    record = json.loads((runs.out / "jobs.json").read_text())
    jobs = {label: e["job_id"] for label, e in record["jobs"].items()}
    # every stage but Scratch-B (its epochs wait for the artifact), each after the jobs of what it needs
    assert len(jobs) == 10 and not any(label.endswith("scratch_b") for label in jobs)
    assert "run the same command again" in out
    for seed in (0, 1):
        large = (bin_dir / f"job{jobs[f'seed {seed} | large']}.sh").read_text()
        for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=30",
                     "--qos=high"):
            assert f"#SBATCH {line}\n" in large, (line, large)
        assert "--dependency" not in large
        prune = (bin_dir / f"job{jobs[f'seed {seed} | l1 | prune']}.sh").read_text()
        assert f"#SBATCH --dependency=afterok:{jobs[f'seed {seed} | large']}\n" in prune
        assert "#SBATCH --ntasks-per-node=1\n" in prune
        for kind in ("pruned", "finetune", "scratch_e"):
            text = (bin_dir / f"job{jobs[f'seed {seed} | l1 | {kind}']}.sh").read_text()
            assert f"#SBATCH --dependency=afterok:{jobs[f'seed {seed} | l1 | prune']}\n" in text, kind
    assert not runs.starts()  # nothing ran here: the cluster is fake

    # --dry-run prints every command and each job's shape
    rc, dry, err = runs.finish(runs.start("--executor", "slurm", "--dry-run", PATH=path))
    assert rc == 0 and dry.count("fake_job.py") == 12, dry + err
    assert "seed 1 | l1 | scratch_e: 2 node(s) x 4 task(s), 4 GPU(s) per node, after seed 1 | l1 | prune" in dry

    rc, out, err = runs.finish(runs.start("--cancel", PATH=path))
    assert rc == 0, out + err
    assert sorted((bin_dir / "cancelled").read_text().split()) == sorted(jobs.values())
    assert out.count("cancelled job") == 10


@pytest.mark.slow  # ~10-20 s: two runners, five jobs of submitit's local executor (three processes each)
def test_local_jobs_outlive_the_runner_which_collects_them_and_continues(runs: FakeRuns) -> None:
    write_experiment(runs.config, seeds=[0], regimes={"scratch_e": {}, "scratch_b": {}})  # 5 stages
    gate = runs.tmp / "gate"
    rc, out, err = runs.finish(runs.start("--executor", "submitit-local", "--no-wait", FAKE_GATE=str(gate)))
    assert rc == 0 and "0/5 stages done, 1 jobs queued or running; run the same command again" in out, out + err
    submitted = json.loads((runs.out / "jobs.json").read_text())["jobs"]
    assert list(submitted) == ["seed 0 | large"]
    wait_for(lambda: runs.starts(), 30, "the large job's start")
    assert alive(runs.starts()[0]["pid"])  # it runs on without the runner
    gate.touch()

    rc, out, err = runs.finish(runs.start("--executor", "submitit-local", seconds=0.2), timeout=120)
    assert rc == 0, out + err
    ran = intervals(runs.events(), runs.out)
    assert len(ran) == 5 and len(runs.starts()) == 5  # the large job was collected, not submitted again
    record = json.loads((runs.out / "jobs.json").read_text())["jobs"]
    assert len(record) == 5 and record["seed 0 | large"]["job_id"] == submitted["seed 0 | large"]["job_id"]
    assert ran["seed0/l1/prune"][0] >= ran["seed0/large"][1]
    for kind in ("pruned", "scratch_e", "scratch_b"):
        assert ran[f"seed0/l1/{kind}"][0] >= ran["seed0/l1/prune"][1], kind
    assert any(a.startswith("--trainer.max_epochs=") for a in ran["seed0/l1/scratch_b"][2]["args"][-3:])
    assert "    seed 0 | l1 | scratch_e: epoch 2/2 | train/loss 0.5 | fake" in out
    assert "[1/5] seed 0 | large: done (job " in out and "all stages finished" in out


@pytest.mark.slow  # ~6-10 s: two runners and two local jobs
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="local job ids are pids, looked up in /proc")
def test_cancel_stops_the_recorded_local_jobs(runs: FakeRuns) -> None:
    rc, out, err = runs.finish(runs.start("--executor", "submitit-local", "--no-wait", seconds=60))
    assert rc == 0, out + err
    wait_for(lambda: len(runs.starts()) == 2, 60, "the large jobs' start")
    rc, out, err = runs.finish(runs.start("--cancel"))
    assert rc == 0 and len(re.findall(r"cancelled job \d+ \(seed \d \| large\)", out)) == 2, out + err
    wait_for(lambda: not any(alive(e["pid"]) for e in runs.starts()), 30, "the cancelled stages' end")
    assert not any(stage_key(runs.out, e["stage"]) for e in runs.events() if e["event"] == "end")
