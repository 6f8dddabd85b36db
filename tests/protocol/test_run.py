"""Running an experiment (``lit_prune.protocol.run``, ``python -m lit_prune.rethink``): a whole tiny experiment,
resumability, the one-config-per-directory rule (and directories made under the old hash), kill/resume
equality, and a variant adopted from the large run's callback.

The default-suite end-to-end test runs every stage of a real experiment, but inside the test process
(``Protocol._execute`` patched to call the stage and prune entry points directly): two CPU cores cannot
afford a dozen fresh Python processes importing torch and Lightning. The kill/resume test (slow) runs the
runner itself as a real process tree, so the subprocess path is exercised too.

The tiny run is built once per module and never changed: tests that run it again work on a copy.
"""

from __future__ import annotations

import json
import os
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

from lit_prune import rethink
from lit_prune.artifact import build_model, load_artifact
from lit_prune.core.budget import scratch_b_budget
from lit_prune.protocol import ExperimentError, Protocol, load_experiment
from tests.helpers import clean_env, execute_in_process, run_process

REPO = Path(__file__).resolve().parents[2]
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


# ---- a whole tiny experiment, stages in-process ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of a 2-seed experiment (L1 variant; fine-tune, Scratch-E, Scratch-B), read by the tests below
    and never written to (see ``tiny_copy``)."""
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


@pytest.fixture
def tiny_copy(tiny_run, tmp_path: Path, monkeypatch) -> dict:
    """A copy of the tiny run's directory, for a test that runs the experiment again."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    monkeypatch.chdir(tiny_run["root"])
    return {**tiny_run, "out": out}


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


def test_results_table_explains_the_pruned_row_with_its_drop(tiny_run) -> None:
    out = tiny_run["out"]
    table = (out / "results.md").read_text()
    mean = {row: statistics.fmean(100 * _metrics(out, s, row)["acc1"] for s in SEEDS) for row in ("unpruned", "pruned")}
    note = next(ln for ln in table.splitlines() if ln.startswith("*Pruned (no retraining)*"))
    assert f"{mean['unpruned'] - mean['pruned']:.1f} points below the unpruned model" in note
    ratio = json.loads((out / "results.json").read_text())["variants"]["l1"]["flops"]["ratio"]
    assert f"removes {100 * (1 - 1 / ratio):.0f}% of the MACs" in note


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
    flops = load_artifact(out / "seed0" / "l1" / "prune" / "pruned.pt").flops
    assert saved["variants"]["l1"]["flops"] == flops.to_dict()
    assert rows["pruned"]["macs"] == rows["finetune"]["macs"] == flops.pruned.macs < rows["unpruned"]["macs"]


def _tensorboard(run_dir: Path) -> dict:
    """Every scalar tag and the HParams plugin data of one TensorBoard run, read as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    hparams, hp_metric = {}, None
    try:
        plugins = acc.PluginTagToContent("hparams")
    except KeyError:  # a run that logged no hyper-parameters (the prune stage's)
        plugins = {}
    for content in plugins.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = {k: v.string_value or v.number_value for k, v in data.session_start_info.hparams.items()}
    if "hp_metric" in acc.Tags()["scalars"]:
        hp_metric = acc.Scalars("hp_metric")[-1].value
    return {"scalars": set(acc.Tags()["scalars"]), "hparams": hparams, "hp_metric": hp_metric}


def test_plot_and_tensorboard_runs_named_as_the_stage_folders(tiny_run) -> None:
    out = tiny_run["out"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for seed in SEEDS:
        for stage in ("large", "l1/pruned", "l1/finetune", "l1/scratch_e", "l1/scratch_b"):
            run = _tensorboard(out / "tb" / f"seed{seed}" / stage)
            variant, _, regime = stage.rpartition("/")
            # hyper-parameters logged once, at the end: seed, regime apart, the real widths, the accuracy
            assert run["hparams"]["seed"] == seed and run["hparams"]["regime"] == regime, (stage, run["hparams"])
            assert run["hparams"]["variant"] == (variant or "unpruned")
            metrics = _metrics(out, seed, regime if variant else "unpruned")
            assert run["hp_metric"] == pytest.approx(metrics["acc1"])
        pruned = _tensorboard(out / "tb" / f"seed{seed}" / "l1" / "scratch_e")
        large = _tensorboard(out / "tb" / f"seed{seed}" / "large")
        assert pruned["hparams"]["widths"] != large["hparams"]["widths"]  # the artifact's, not the base config's
        assert pruned["hparams"]["method"] == "l1_norm"
        # the prune stage's run: FLOPs before and after, and every layer's kept channels
        prune = _tensorboard(out / "tb" / f"seed{seed}" / "l1" / "prune")
        assert {"prune/macs_dense", "prune/macs_pruned", "prune/flops_ratio", "prune/params_pruned"} <= prune["scalars"]
        assert any(tag.startswith("prune/kept/") for tag in prune["scalars"])


def test_scratch_b_trains_int_e_times_r_epochs(tiny_run) -> None:
    out = tiny_run["out"]
    epochs = 1  # TINY_ARGS
    for seed in SEEDS:
        r = load_artifact(out / f"seed{seed}" / "l1" / "prune" / "pruned.pt").flops.ratio
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
            assert raw["architecture"] == pruned.architecture.to_dict(), (seed, stage)
            model = build_model(load_artifact(path)).eval()
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        # the weights moved in training and the artifact holds them
        ft = torch.load(out / f"seed{seed}" / "l1" / "finetune" / "model.pt", weights_only=True)["state_dict"]
        assert any(not torch.equal(v, pruned.state_dict[k]) for k, v in ft.items())
        large = torch.load(out / f"seed{seed}" / "large" / "model.pt", weights_only=True)
        assert large["flops"]["pruned"]["macs"] == pruned.flops.dense.macs


def test_the_directory_records_its_config_and_hash(tiny_run) -> None:
    marker = json.loads((tiny_run["out"] / "experiment.json").read_text())
    config = load_experiment(tiny_run["config"])
    assert marker["hash"] == config.hash and marker["hash_version"] == 2
    assert marker["config"] == json.loads(json.dumps(config.to_dict()))
    assert marker["files"] == config.file_digests() and list(marker["files"])[0] == config.base


def test_second_run_skips_every_stage_and_gives_the_same_results(tiny_copy, monkeypatch, capsys) -> None:
    out = tiny_copy["out"]
    before = (out / "results.json").read_text()

    def refuse(self, st, verbose):
        raise AssertionError(f"{st.label} ran again")

    monkeypatch.setattr(Protocol, "_execute", refuse)
    Protocol(load_experiment(tiny_copy["config"]), out).run()
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


def test_a_stage_with_corrupted_metrics_is_run_again(tiny_copy, monkeypatch, capsys) -> None:
    out = tiny_copy["out"]
    stage = out / "seed1" / "l1" / "scratch_e"
    good = json.loads((stage / "metrics.json").read_text())
    results_before = json.loads((out / "results.json").read_text())
    (stage / "metrics.json").write_text('{"acc1": 0.5, ')  # a write cut short
    ran = []

    def record(self, st, verbose):
        ran.append(st.label)
        execute_in_process(self, st, verbose)

    monkeypatch.setattr(Protocol, "_execute", record)
    results = Protocol(load_experiment(tiny_copy["config"]), out).run()
    assert ran == ["seed 1 | l1 | scratch_e"]
    assert "seed 1 | l1 | scratch_e: done, skipped" not in capsys.readouterr().out
    again = json.loads((stage / "metrics.json").read_text())
    # it resumed from its final checkpoint: same model, same test accuracy
    assert {k: again[k] for k in ("acc1", "acc5", "loss", "epochs", "max_epochs")} == {
        k: good[k] for k in ("acc1", "acc5", "loss", "epochs", "max_epochs")}
    for row in REGIME_ROWS:
        assert results["variants"]["l1"]["rows"][row]["acc1"] == results_before["variants"]["l1"]["rows"][row]["acc1"]


# ---- the directory check: a changed file named in args, and directories made under the old hash ----

def _tied(tmp_path: Path, monkeypatch, **overrides) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)
    config = _write_experiment(tmp_path / "exp.yaml", **overrides)
    out = tmp_path / "out"
    Protocol(load_experiment(config), out).prepare()
    return config, out


def test_editing_a_config_named_in_args_protects_the_directory(tmp_path: Path, monkeypatch) -> None:
    callback = tmp_path / "callback.yaml"
    callback.write_text("model:\n  lr: 0.1\n")
    config, out = _tied(tmp_path, monkeypatch, large={"args": [f"--config={callback}"]})
    Protocol(load_experiment(config), out).prepare()  # the same config: accepted
    callback.write_text("model:\n  lr: 0.2\n")
    before = _snapshot(out)
    with pytest.raises(ExperimentError, match=rf"another config .*files that differ: {callback}; use another --out"):
        Protocol(load_experiment(config), out).prepare()
    assert _snapshot(out) == before


def _make_legacy(out: Path, config: Path) -> dict:
    """experiment.json as the previous version wrote it (no hash_version, the old hash)."""
    exp = load_experiment(config)
    old = {"name": exp.name, "hash": exp.legacy_hash, "config": yaml.safe_load(config.read_text())}
    (out / "experiment.json").write_text(json.dumps(old))
    return old


def test_a_directory_of_the_old_hash_is_re_tied_when_the_old_hash_covered_everything(tmp_path, monkeypatch,
                                                                                       capsys) -> None:
    config, out = _tied(tmp_path, monkeypatch)
    old = _make_legacy(out, config)
    exp = load_experiment(config)
    Protocol(exp, out).prepare()
    assert f"written under the older config hash {old['hash']}" in capsys.readouterr().out
    marker = json.loads((out / "experiment.json").read_text())
    assert marker["hash"] == exp.hash and marker["hash_version"] == 2
    Protocol(exp, out).prepare()  # and from now on the new hash


def test_a_directory_of_the_old_hash_with_unhashed_files_gets_a_clear_message(tmp_path, monkeypatch) -> None:
    callback = tmp_path / "callback.yaml"
    callback.write_text("model:\n  lr: 0.1\n")
    config, out = _tied(tmp_path, monkeypatch, large={"args": [f"--config={callback}"]})
    old = _make_legacy(out, config)
    exp = load_experiment(config)
    before = _snapshot(out)
    with pytest.raises(ExperimentError) as err:
        Protocol(exp, out).prepare()
    message = str(err.value)
    assert "older lit-prune" in message and str(callback) in message and old["hash"] in message
    assert f'set "hash" in {out / "experiment.json"} to {exp.hash}' in message
    assert _snapshot(out) == before
    # another config under the old hash is still another config, and says why it cannot tell more
    other = _write_experiment(tmp_path / "other.yaml", seeds=[5], large={"args": [f"--config={callback}"]})
    with pytest.raises(ExperimentError, match=r"another config .*written by an older lit-prune"):
        Protocol(load_experiment(other), out).prepare()


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


# ---- a variant whose artifact the large run's callback writes ----------------------------------------

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
    written = sorted((out / "tb" / "seed0" / "large").rglob("sfp-masked.pt"))  # the large run's TensorBoard run
    adopted = out / "seed0" / "sfp" / "prune" / "pruned.pt"
    assert len(written) == 1 and adopted.read_bytes() == written[0].read_bytes()
    assert load_artifact(adopted).provenance.method == "sfp"
    assert json.loads((out / "seed0" / "sfp" / "scratch_e" / "metrics.json").read_text())["epochs"] == 1


def test_an_unreadable_experiment_record_is_refused(tmp_path: Path, monkeypatch) -> None:
    config, out = _tied(tmp_path, monkeypatch)
    (out / "experiment.json").write_text('{"name": "tiny", ')
    with pytest.raises(ExperimentError, match="is not an experiment record"):
        Protocol(load_experiment(config), out).prepare()
