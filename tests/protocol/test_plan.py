"""Planning (``lit_prune.protocol.plan``) and the directory layout: every shipped experiment dry-runs, the
quickstart's stages and commands, predefined architectures, and the paths of a run (the on-disk contract
that lets an existing run resume)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lit_prune.protocol import ExperimentError, Protocol, RunLayout, load_experiment
from lit_prune.protocol.config import load_experiments

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_config_loads_and_dry_runs(path: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # configs name their files relative to the repository root
    for exp in load_experiments(path.relative_to(REPO)):  # a sweep file: each of its experiments
        _dry_runs(exp, tmp_path / exp.name, capsys)


def _dry_runs(exp, out: Path, capsys) -> None:
    protocol = Protocol(exp, out)
    stages = protocol.plan()
    assert protocol.run(dry_run=True) == {}
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    # prune, pruned (not for a fresh architecture: no weights to test) and the variant's regimes
    per_variant = [2 + len(exp.regimes_of(v)) - v.fresh for v in exp.variants]
    assert len(printed) == len(stages) == len(exp.seeds) * (1 + sum(per_variant))
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
    (variant,) = [v.name for v in exp.variants]
    kinds = ["large", "prune", "pruned", "finetune", "scratch_e", "scratch_b"]
    assert [(s.seed, s.kind) for s in stages] == [(seed, k) for seed in exp.seeds for k in kinds]
    assert len(exp.seeds) >= 2
    by_kind = {s.kind: s for s in stages if s.seed == exp.seeds[0]}
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


def test_every_stage_directory_comes_from_the_layout(monkeypatch, tmp_path) -> None:
    """The on-disk layout of a run, spelled out: a directory written by an earlier version still resumes."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    layout = RunLayout(out)
    protocol = Protocol(load_experiment("configs/experiments/quickstart_lottery.yaml"), out)
    for st in protocol.plan():
        expected = out / f"seed{st.seed}" / ("large" if st.variant is None else f"{st.variant}/{st.kind}")
        assert st.dir == expected == layout.stage_dir(st.seed, st.variant, st.kind)
        if st.kind == "prune":
            assert f"--out={out / f'seed{st.seed}' / st.variant / 'prune' / 'pruned.pt'}" in st.command
        if st.variant == "round2" and st.kind == "prune":  # round 2 prunes round 1's winning ticket
            assert f"--checkpoint={out / f'seed{st.seed}' / 'round1' / 'winning_ticket' / 'model.pt'}" in st.command
        if st.kind not in ("prune", "large"):
            yaml_doc = protocol.planner.stage_yaml(st)["trainer"]["logger"]["init_args"]
            # TensorBoard runs nest as the stage folders: tb/seed<N>/<variant>/<kind>
            assert yaml_doc == {"save_dir": str(out / "tb"), "name": f"seed{st.seed}",
                                "version": f"{st.variant}/{st.kind}", "default_hp_metric": False}
            assert f"--config={st.dir / 'stage.yaml'}" in st.command
    assert layout.marker == out / "experiment.json"
    assert layout.large_checkpoint(1) == out / "seed1" / "large" / "checkpoints" / "last.ckpt"
    # the large run's TensorBoard directory (tb/large/seed0 in runs of earlier versions), then its stage folder
    assert layout.training_artifact_places(0) == [out / "tb" / "seed0" / "large", out / "tb" / "large" / "seed0",
                                                  out / "seed0" / "large"]
    assert [layout.results_md, layout.results_json, layout.results_png] == [
        out / "results.md", out / "results.json", out / "results.png"]
    assert layout.row_dir(0, "round1", "unpruned") == out / "seed0" / "large"


# ---- Scratch-B's FLOPs convention ------------------------------------------------------------------------
_SLIM70 = [19, 15, "M", 41, 41, "M", 74, 67, 93, 73, "M", 147, 162, 157, 155, "M", 152, 148, 157, 150]


def _scratch_b_of(tmp_path: Path, monkeypatch, convention: str, dense_macs: int | None = None):
    """Scratch-B of a planned tiny experiment (160 epochs) whose artifact is VGG-19 slimmed at 70%."""
    from lit_prune.artifact import make_artifact, save_artifact
    from lit_prune.core.flops import count_flops
    from lit_prune.methods.state import Counts
    from lit_prune.models import create_model

    monkeypatch.chdir(REPO)
    base = REPO / "configs" / "quickstart.yaml"
    exp = {"name": "conv", "base": str(base), "seeds": [0], "args": ["--trainer.max_epochs=160"],
           "variants": [{"name": "p70", "method": str(REPO / "configs" / "methods" / "l1_quickstart.yaml")}],
           "regimes": {"scratch_b": {"rule": "fractions", "convention": convention}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    protocol = Protocol(load_experiment(path), tmp_path / "out")
    stage = next(s for s in protocol.plan() if s.kind == "scratch_b")
    dense = count_flops(create_model("slim_vgg19"))
    art = make_artifact(create_model("slim_vgg19", cfg=_SLIM70), method="test",
                        dense=Counts(macs=dense.macs if dense_macs is None else dense_macs, params=dense.params))
    save_artifact(art, RunLayout(tmp_path / "out").artifact(0, "p70"))
    return protocol.scratch_b(stage)


@pytest.mark.parametrize("convention,epochs,milestones,ratio", [("macs", 1768, [884, 1326], 11.050),
                                                                ("reference", 1763, [881, 1322], 11.019)])
def test_scratch_b_counts_flops_in_the_configured_convention(convention, epochs, milestones, ratio, tmp_path,
                                                             monkeypatch) -> None:
    budget = _scratch_b_of(tmp_path, monkeypatch, convention)
    assert (budget.epochs, budget.milestones, round(budget.ratio, 3)) == (epochs, milestones, ratio)
    assert budget.convention == convention and not budget.fallback
    assert f"--trainer.max_epochs={epochs}" in budget.args


def test_reference_convention_falls_back_to_the_stored_ratio_with_a_note(tmp_path, monkeypatch, capsys) -> None:
    """A large model that cannot be rebuilt (its recorded MACs are not the artifact architecture's)."""
    budget = _scratch_b_of(tmp_path, monkeypatch, "reference", dense_macs=2 * 398136320)
    assert budget.convention == "macs" and budget.epochs == int(160 * 2 * 398136320 / 36029796)
    assert "reference FLOPs unavailable" in budget.note and "the artifact recorded 796272640" in budget.note
    assert "using the artifact's MACs ratio" in capsys.readouterr().err
