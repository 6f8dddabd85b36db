"""The protocol runner (``python -m lit_prune.rethink``): planning, a whole tiny experiment, resumability,
the one-config-per-directory rule, kill/resume equality, and a retraining stage under DDP.

The default-suite end-to-end test runs every stage of a real experiment, but inside the test process
(``Protocol._execute`` patched to call the stage and prune entry points directly): two CPU cores cannot
afford a dozen fresh Python processes importing torch and Lightning. The kill/resume test (slow) runs the
runner itself as a real process tree, so the subprocess path is exercised too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from callbacks import L1FilterPruning
from lit_prune import rethink
from lit_prune.artifact import build_model, load_artifact
from lit_prune.core.budget import scratch_b_budget
from lit_prune.models import create_model
from lit_prune.rethink import ExperimentError, Protocol, load_experiment
from lit_prune.stage import run_stage
from tests.helpers import clean_env, execute_in_process, run_process

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
# jsonargparse reads "1" for an int-or-float option as 1.0, which Lightning takes as "100% of the batches":
# every limit below is >= 2 for that reason.
TINY_ARGS = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
             "--trainer.limit_test_batches=2", "--data.batch_size=16", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false"]
SEEDS = [0, 1]
REGIME_ROWS = {"unpruned": "Unpruned", "pruned": "Pruned (no retraining)", "finetune": "Fine-tuned",
               "scratch_e": "Scratch-E", "scratch_b": "Scratch-B"}


pytestmark = pytest.mark.usefixtures("isolated")


def _write_experiment(path: Path, **overrides) -> Path:
    exp = {
        "name": "tiny",
        "base": str(REPO / "configs" / "quickstart.yaml"),
        "seeds": SEEDS,
        "args": TINY_ARGS,
        "variants": [{"name": "l1", "method": str(REPO / "configs" / "methods" / "l1_quickstart.yaml")}],
        "regimes": {"finetune": {"args": ["--model.lr=0.01", "--model.schedule=constant", "--trainer.max_epochs=1"]},
                    "scratch_e": {}, "scratch_b": {"rule": "fractions"}},
    }
    exp.update(overrides)
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---- planning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_config_loads_and_dry_runs(path: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # configs name their files relative to the repository root
    exp = load_experiment(path.relative_to(REPO))
    out = tmp_path / "out"
    protocol = Protocol(exp, out)
    stages = protocol.plan()
    assert protocol.run(dry_run=True) == {}
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    per_variant = [2 + len(exp["regimes"]) - bool(v.get("width_config")) for v in exp["variants"]]  # no "pruned"
    assert len(printed) == len(stages) == len(exp["seeds"]) * (1 + sum(per_variant))
    for line, st in zip(printed, stages, strict=True):
        assert line.startswith(f"[{stages.index(st) + 1}/{len(stages)}] {st.label}")
        if st.kind != "prune":  # every training or test stage states its epochs (or how Scratch-B gets them)
            assert re.search(r"\(\d+ epochs\)|epochs = int\(", line), line
    assert not out.exists(), "a dry run must not write anything"


def test_quickstart_plan_has_every_stage_per_seed(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    exp = load_experiment("configs/experiments/quickstart.yaml")
    protocol = Protocol(exp, Path("/nonexistent/quickstart"))
    stages = protocol.plan()
    (variant,) = [v["name"] for v in exp["variants"]]
    kinds = ["large", "prune", "pruned", "finetune", "scratch_e", "scratch_b"]
    assert [(s.seed, s.kind) for s in stages] == [(seed, k) for seed in exp["seeds"] for k in kinds]
    assert len(exp["seeds"]) >= 2
    by_kind = {s.kind: s for s in stages if s.seed == exp["seeds"][0]}
    assert by_kind["large"].epochs == by_kind["scratch_e"].epochs == protocol.epochs > 0
    assert by_kind["pruned"].epochs == 0
    assert by_kind["finetune"].epochs < protocol.epochs  # fine-tuning is short
    for kind in ("pruned", "finetune", "scratch_e", "scratch_b"):
        st = by_kind[kind]
        assert st.variant == variant
        assert f"--model.artifact={st.dir.parent / 'prune' / 'pruned.pt'}" in st.command
        assert ("--model.regime=finetune" if kind in ("pruned", "finetune") else "--model.regime=scratch") in st.command
        assert f"--seed_everything={st.seed}" in st.command
        assert st.command[1:3] == ["-m", "lit_prune.stage"]


def test_predefined_architectures_plan_scratch_runs_only(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    exp = load_experiment("configs/experiments/thinet_vgg16.yaml")
    stages = Protocol(exp, tmp_path / "out").plan()
    assert {s.kind for s in stages} == {"large", "prune", "scratch_e", "scratch_b"}  # nothing pruned to test
    gap = next(s for s in stages if s.variant == "thinet_gap" and s.kind == "prune")
    assert "--arch=vgg16_gap" in gap.command and "--width-config=thinet_gap" in gap.command
    scratch = next(s for s in stages if s.variant == "thinet_gap" and s.kind == "scratch_e")
    assert "--model.arch=vgg16_gap" in scratch.command
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/experiments/thinet_vgg16.yaml").read_text()),
                                   "regimes": {"finetune": {}, "scratch_e": {}}}))
    with pytest.raises(ExperimentError, match="drop the finetune regime"):
        load_experiment(bad)


# ---- a whole tiny experiment, stages in-process ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of a 2-seed experiment (L1 variant; fine-tune, Scratch-E, Scratch-B), shared by the tests below."""
    root = tmp_path_factory.mktemp("rethink")
    config = _write_experiment(root / "tiny.yaml")
    out = root / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(Protocol, "_execute", execute_in_process)
    mp.chdir(root)
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        mp.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = Protocol(load_experiment(config), out).run()
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return {"root": root, "config": config, "out": out, "results": results}


def _metrics(out: Path, seed: int, stage: str) -> dict:
    path = out / f"seed{seed}" / ("large" if stage == "unpruned" else f"l1/{stage}") / "metrics.json"
    return json.loads(path.read_text())


def test_results_table_has_every_row_with_mean_and_std(tiny_run) -> None:
    out = tiny_run["out"]
    table = (out / "results.md").read_text()
    for row, label in REGIME_ROWS.items():
        accs = [100 * _metrics(out, s, row)["acc1"] for s in SEEDS]
        mean, std = statistics.fmean(accs), statistics.stdev(accs)
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {label} |")), None)
        assert line is not None, f"no {label} row in\n{table}"
        assert f"| {mean:.2f} ± {std:.2f} | 2 |" in line, line


def test_results_json_matches_the_stage_metrics(tiny_run) -> None:
    out = tiny_run["out"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(tiny_run["results"]))
    assert saved["seeds"] == SEEDS
    rows = saved["variants"]["l1"]["rows"]
    assert list(rows) == list(REGIME_ROWS)
    for row, r in rows.items():
        per_seed = [_metrics(out, s, row) for s in SEEDS]
        assert r["acc1"] == [100 * m["acc1"] for m in per_seed]
        assert r["acc1_mean"] == pytest.approx(statistics.fmean(r["acc1"]))
        assert r["acc1_std"] == pytest.approx(statistics.stdev(r["acc1"]))
        assert r["n"] == 2
        assert r["epochs"] == sorted({m["max_epochs"] for m in per_seed})
        assert r["macs"] == per_seed[0]["macs"]
        assert r["wall_time_s"] == pytest.approx(statistics.fmean(m["wall_time_s"] for m in per_seed))
    flops = load_artifact(out / "seed0" / "l1" / "prune" / "pruned.pt")["flops"]
    assert saved["variants"]["l1"]["flops"] == flops
    assert rows["pruned"]["macs"] == rows["finetune"]["macs"] == flops["pruned"]["macs"] < rows["unpruned"]["macs"]


def test_plot_and_tensorboard_runs_exist(tiny_run) -> None:
    out = tiny_run["out"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for seed in SEEDS:
        dirs = [out / "tb" / "large" / f"seed{seed}"]
        dirs += [out / "tb" / "l1" / st / f"seed{seed}" for st in ("pruned", "finetune", "scratch_e", "scratch_b")]
        for d in dirs:
            assert list(d.glob("events.out.tfevents.*")), f"no TensorBoard events in {d}"


def test_scratch_b_trains_int_e_times_r_epochs(tiny_run) -> None:
    out = tiny_run["out"]
    epochs = 1  # TINY_ARGS
    for seed in SEEDS:
        r = load_artifact(out / f"seed{seed}" / "l1" / "prune" / "pruned.pt")["flops"]["ratio"]
        m = _metrics(out, seed, "scratch_b")
        assert r > 1.5  # 30% of the filters of every layer: about 2x fewer MACs
        assert m["max_epochs"] == m["epochs"] == int(epochs * r) >= 2
        assert m["milestones"] == scratch_b_budget(epochs, r).milestones
        assert _metrics(out, seed, "scratch_e")["max_epochs"] == epochs
        assert (m["regime"], _metrics(out, seed, "finetune")["regime"]) == ("scratch", "finetune")


def test_every_retrained_model_is_a_loadable_artifact(tiny_run) -> None:
    out = tiny_run["out"]
    for seed in SEEDS:
        pruned = load_artifact(out / f"seed{seed}" / "l1" / "prune" / "pruned.pt")
        for stage in ("pruned", "finetune", "scratch_e", "scratch_b"):
            path = out / f"seed{seed}" / "l1" / stage / "model.pt"
            raw = torch.load(path, map_location="cpu", weights_only=True)
            assert raw["architecture"] == pruned["architecture"], (seed, stage)
            model = build_model(load_artifact(path)).eval()
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        # the weights moved in training and the artifact holds them
        ft = torch.load(out / f"seed{seed}" / "l1" / "finetune" / "model.pt", weights_only=True)["state_dict"]
        assert any(not torch.equal(v, pruned["state_dict"][k]) for k, v in ft.items())
        large = torch.load(out / f"seed{seed}" / "large" / "model.pt", weights_only=True)
        assert large["flops"]["pruned"]["macs"] == pruned["flops"]["dense"]["macs"]


def test_second_run_skips_every_stage_and_gives_the_same_results(tiny_run, monkeypatch, capsys) -> None:
    out = tiny_run["out"]
    before = (out / "results.json").read_text()

    def refuse(self, st, verbose):
        raise AssertionError(f"{st.label} ran again")

    monkeypatch.setattr(Protocol, "_execute", refuse)
    monkeypatch.chdir(tiny_run["root"])
    Protocol(load_experiment(tiny_run["config"]), out).run()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert len(lines) == 12 and all(ln.endswith(": done, skipped") for ln in lines), lines
    assert (out / "results.json").read_text() == before


def test_another_config_is_refused_and_the_directory_left_untouched(tiny_run, monkeypatch, capsys) -> None:
    out = tiny_run["out"]
    other = _write_experiment(tiny_run["root"] / "other.yaml", seeds=[0])
    own_hash = json.loads((out / "experiment.json").read_text())["hash"]
    other_hash = rethink.config_hash(load_experiment(other))
    assert other_hash != own_hash
    before = _snapshot(out)
    monkeypatch.chdir(tiny_run["root"])
    assert rethink.main(["--config", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert own_hash in err and other_hash in err, err
    assert _snapshot(out) == before
    with pytest.raises(ExperimentError, match=own_hash):
        Protocol(load_experiment(other), out).run()
    assert _snapshot(out) == before


def test_a_stage_with_corrupted_metrics_is_run_again(tiny_run, monkeypatch, capsys) -> None:
    out = tiny_run["out"]
    stage = out / "seed1" / "l1" / "scratch_e"
    good = json.loads((stage / "metrics.json").read_text())
    results_before = json.loads((out / "results.json").read_text())
    (stage / "metrics.json").write_text('{"acc1": 0.5, ')  # a write cut short
    ran = []

    def record(self, st, verbose):
        ran.append(st.label)
        execute_in_process(self, st, verbose)

    monkeypatch.setattr(Protocol, "_execute", record)
    monkeypatch.chdir(tiny_run["root"])
    results = Protocol(load_experiment(tiny_run["config"]), out).run()
    assert ran == ["seed 1 | l1 | scratch_e"]
    assert "seed 1 | l1 | scratch_e: done, skipped" not in capsys.readouterr().out
    again = json.loads((stage / "metrics.json").read_text())
    # it resumed from its final checkpoint: same model, same test accuracy
    assert {k: again[k] for k in ("acc1", "acc5", "loss", "epochs", "max_epochs")} == {
        k: good[k] for k in ("acc1", "acc5", "loss", "epochs", "max_epochs")}
    for row in REGIME_ROWS:
        assert results["variants"]["l1"]["rows"][row]["acc1"] == results_before["variants"]["l1"]["rows"][row]["acc1"]


# ---- resume, in-process ---------------------------------------------------------------------------

def test_stage_resumed_from_an_epoch_checkpoint_equals_the_uninterrupted_stage(tmp_path: Path, monkeypatch) -> None:
    """Also from a checkpoint written in another directory (the experiment was moved): the stage still
    writes its own last.ckpt, never a last-v1.ckpt that a later resume or the pruning step would miss."""
    monkeypatch.chdir(tmp_path)
    common = [f"--config={REPO / 'configs' / 'quickstart.yaml'}", "--seed_everything=3", "--trainer.logger=false",
              "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
              "--trainer.limit_test_batches=2", "--data.batch_size=16", "--trainer.deterministic=true",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--checkpoint.save_top_k=-1"]
    full = run_stage([f"--stage_dir={tmp_path / 'a'}", *common])
    moved = tmp_path / "b" / "checkpoints"
    moved.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch000.ckpt", moved / "last.ckpt")  # killed after epoch 1
    resumed = run_stage([f"--stage_dir={tmp_path / 'b'}", *common])

    keys = ("acc1", "acc5", "loss", "epochs", "max_epochs")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in moved.glob("last*")) == ["last.ckpt"]
    assert torch.load(moved / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2


# ---- kill and resume: a real process tree ---------------------------------------------------------

def _run_runner(config: Path, out: Path, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return run_process([sys.executable, "-m", "lit_prune.rethink", "--config", str(config), "--out", str(out)], cwd,
                       clean_env(), timeout)


def _final_state(out: Path) -> dict:
    """Per-stage test metrics and retrained weights of a finished run (wall times excluded)."""
    state = {}
    for stage in ("large", "l1/pruned", "l1/scratch_e"):
        m = json.loads((out / "seed0" / stage / "metrics.json").read_text())
        weights = torch.load(out / "seed0" / stage / "model.pt", weights_only=True)["state_dict"]
        state[stage] = ({k: m[k] for k in ("acc1", "acc5", "loss", "epochs", "max_epochs")}, weights)
    return state


@pytest.mark.slow  # ~2-3 min on 2 busy cores: nine stage processes, each importing torch and Lightning
def test_killed_runner_resumes_to_the_results_of_an_uninterrupted_run(tmp_path: Path) -> None:
    # Scratch-E long enough to be killed between two epoch checkpoints (4 epochs of 40 batches)
    args = ["--trainer.max_epochs=4", "--trainer.limit_train_batches=40", "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=4", "--data.batch_size=16", "--trainer.deterministic=true",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    config = _write_experiment(tmp_path / "exp.yaml", name="resume", seeds=[0], args=args,
                               regimes={"scratch_e": {}})

    reference = tmp_path / "uninterrupted"
    _run_runner(config, reference, tmp_path)

    out = tmp_path / "killed"
    last = out / "seed0" / "l1" / "scratch_e" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "lit_prune.rethink", "--config", str(config), "--out", str(out)],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not last.is_file():
            assert proc.poll() is None, "the runner ended before Scratch-E wrote a checkpoint"
            assert time.monotonic() < deadline, "Scratch-E wrote no checkpoint in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage process: a lost node, not a clean exit
        proc.wait()
    assert not (last.parent.parent / "metrics.json").exists(), "the stage finished before the kill"
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert 0 <= epoch < 3, f"killed after epoch {epoch}, too late to test a resume"

    second = _run_runner(config, out, tmp_path)
    assert second.stdout.count("done, skipped") == 3  # large, prune, pruned
    assert "resuming" in (last.parent.parent / "stage.log").read_text()

    killed, ref = _final_state(out), _final_state(reference)
    for stage, (metrics, weights) in ref.items():
        assert killed[stage][0] == metrics, stage
        assert killed[stage][1].keys() == weights.keys()
        for k, v in weights.items():
            assert torch.equal(killed[stage][1][k], v), f"{stage}: {k} differs after the resume"
    assert json.loads((out / "results.json").read_text())["variants"]["l1"]["rows"]["scratch_e"]["acc1"] == \
        json.loads((reference / "results.json").read_text())["variants"]["l1"]["rows"]["scratch_e"]["acc1"]


# ---- DDP: one retraining stage on two CPU processes ----------------------------------------------

def test_retraining_stage_under_ddp_writes_one_metrics_file_and_one_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("cifar_vgg11", cfg=[16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128], num_classes=10)
    artifact = tmp_path / "pruned.pt"
    L1FilterPruning(prune_ratio=0.3).prune(model.eval(), path=str(artifact))
    stage = tmp_path / "stage"
    cmd = [sys.executable, "-m", "lit_prune.stage", f"--stage_dir={stage}",
           f"--config={REPO / 'configs' / 'quickstart.yaml'}", "--seed_everything=0",
           f"--model.artifact={artifact}", "--model.regime=scratch", "--trainer.logger=false",
           "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
           "--data.batch_size=16", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]
    run_process(cmd, tmp_path, clean_env())

    assert sorted(p.name for p in stage.rglob("metrics.json")) == ["metrics.json"]
    assert sorted(p.name for p in stage.rglob("*.pt")) == ["model.pt"]
    assert not list(stage.rglob("*.tmp"))
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 1 and metrics["regime"] == "scratch"
    assert 0.0 <= metrics["acc1"] <= 1.0
    art = load_artifact(stage / "model.pt")
    assert art["architecture"] == load_artifact(artifact)["architecture"]
    assert (stage / "checkpoints" / "last.ckpt").is_file()


def test_variant_from_training_adopts_the_artifact_the_large_run_wrote(tmp_path: Path, monkeypatch) -> None:
    # SFP prunes during training: its callback writes sfp-masked.pt into the large stage's log directory
    method = tmp_path / "sfp.yaml"
    method.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "callbacks.SoftFilterPruning", "init_args": {"prune_ratio": 0.3, "layers": ["*"]}}]}}))
    config = _write_experiment(tmp_path / "sfp_tiny.yaml", seeds=[0], large={"args": [f"--config={method}"]},
                               variants=[{"name": "sfp", "from_training": "sfp-masked.pt"}],
                               regimes={"scratch_e": {}})
    monkeypatch.setattr(Protocol, "_execute", execute_in_process)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    Protocol(load_experiment(config), out).run()
    written = sorted((out / "tb" / "large" / "seed0").rglob("sfp-masked.pt"))
    adopted = out / "seed0" / "sfp" / "prune" / "pruned.pt"
    assert len(written) == 1 and adopted.read_bytes() == written[0].read_bytes()
    assert load_artifact(adopted)["provenance"]["method"] == "sfp"
    assert json.loads((out / "seed0" / "sfp" / "scratch_e" / "metrics.json").read_text())["epochs"] == 1
