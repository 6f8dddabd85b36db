"""Sweeps in experiment configs (``lit_prune.protocol.config``): axes expanding into variants, regimes or whole
experiments with generated names, and a hash that follows the axes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_prune.protocol import ExperimentError, load_experiment
from lit_prune.protocol.config import load_experiments, swept_name

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs" / "quickstart.yaml")
METHOD = str(REPO / "configs" / "methods" / "l1_quickstart.yaml")


def _write(path: Path, **overrides) -> Path:
    exp = {"name": "tiny", "base": BASE, "seeds": [0], "args": ["--trainer.max_epochs=3"],
           "variants": [{"name": "l1", "method": METHOD, "method_args": {"prune_ratio": "{ratio}"},
                         "sweep": {"ratio": [0.3, 0.5]}}],
           "regimes": {"finetune": {"args": ["--model.lr={lr}"], "sweep": {"lr": [0.01, 0.001]}}, "scratch_e": {}}}
    exp.update(overrides)
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def test_a_variant_and_a_regime_sweep_expand_with_generated_names(tmp_path: Path) -> None:
    config = load_experiment(_write(tmp_path / "exp.yaml"))
    assert [v.name for v in config.variants] == ["l1_ratio0.3", "l1_ratio0.5"]
    # a field that is only "{ratio}" takes the value itself: a number, as the method's prune_ratio must be
    assert [v.method_args for v in config.variants] == [{"prune_ratio": 0.3}, {"prune_ratio": 0.5}]
    assert list(config.regimes) == ["finetune_lr0.01", "finetune_lr0.001", "scratch_e"]
    ft = config.regimes["finetune_lr0.001"]
    assert ft.args == ("--model.lr=0.001",) and ft.regime == "finetune"  # the defaults of the regime it sweeps
    assert config.to_dict()["variants"][1] == {"name": "l1_ratio0.5", "method": METHOD,
                                               "method_args": {"prune_ratio": 0.5}}


def test_the_hash_changes_with_an_axis(tmp_path: Path) -> None:
    first = load_experiment(_write(tmp_path / "a.yaml")).hash
    assert load_experiment(_write(tmp_path / "b.yaml")).hash == first  # stable
    ratio = [{"name": "l1", "method": METHOD, "method_args": {"prune_ratio": "{ratio}"},
              "sweep": {"ratio": [0.3, 0.6]}}]
    assert load_experiment(_write(tmp_path / "c.yaml", variants=ratio)).hash != first
    lr = {"finetune": {"args": ["--model.lr={lr}"], "sweep": {"lr": [0.01, 0.002]}}, "scratch_e": {}}
    assert load_experiment(_write(tmp_path / "d.yaml", regimes=lr)).hash != first


def test_a_named_template_and_a_method_axis(tmp_path: Path) -> None:
    other = tmp_path / "l1_other.yaml"
    other.write_text(Path(METHOD).read_text())
    variants = [{"name": "m-{method}", "method": "{method}", "sweep": {"method": [METHOD, str(other)]}}]
    config = load_experiment(_write(tmp_path / "exp.yaml", variants=variants))
    assert [(v.name, v.method) for v in config.variants] == [("m-l1_quickstart", METHOD), ("m-l1_other", str(other))]
    assert swept_name("p", {"a": 1, "b": True}) == "p_a1_btrue"


def test_a_top_level_sweep_makes_one_experiment_per_point_and_select_picks(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.yaml", name="tiny_lr{lr}", args=["--trainer.max_epochs=3", "--model.lr={lr}"],
                  sweep={"lr": [0.1, 0.01], "seed": [0, 1]}, seeds=["{seed}"])
    configs = load_experiments(path)
    assert [c.name for c in configs] == ["tiny_lr0.1_seed0", "tiny_lr0.1_seed1", "tiny_lr0.01_seed0",
                                         "tiny_lr0.01_seed1"]
    assert [c.seeds for c in configs] == [(0,), (1,), (0,), (1,)]
    assert len({c.hash for c in configs}) == 4
    (picked,) = load_experiments(path, {"lr": "0.01", "seed": "1"})
    assert picked.name == "tiny_lr0.01_seed1" and picked.args[-1] == "--model.lr=0.01"
    with pytest.raises(ExperimentError, match=r"is a sweep of 4 experiments \(tiny_lr0.1_seed0, "):
        load_experiment(path)
    with pytest.raises(ExperimentError, match=r"no point of the sweep has \{'lr': '0.5'\}; the axes' values"):
        load_experiments(path, {"lr": "0.5"})
    with pytest.raises(ExperimentError, match=r"unknown axes \['depth'\]"):
        load_experiments(path, {"depth": "56"})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"variants": [{"name": "l1", "method": METHOD, "sweep": {"ratio": []}}]},
     r"variants\[0\].sweep.ratio must be a non-empty list of plain values"),
    ({"variants": [{"name": "l1", "method": METHOD, "sweep": [0.3]}]}, r"variants\[0\].sweep must map axis names"),
    ({"variants": [{"name": "l1", "method": METHOD, "sweep": {"ratio": [0.3, 0.3]}}]}, r"has repeated values"),
    ({"variants": [{"name": "l1", "method": METHOD, "sweep": {"a-b": [1]}}]}, r"axis name 'a-b' must be a word"),
    ({"sweep": {"lr": [0.1, 0.01]}, "out": "runs/one"}, r"out 'runs/one' would hold every experiment"),
])
def test_bad_sweeps_are_refused_with_the_key(overrides: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=message):
        load_experiments(_write(tmp_path / "exp.yaml", **overrides))


def test_the_lottery_sweeps_keep_the_names_of_the_files_they_replace(monkeypatch) -> None:
    """The fourteen lottery configs became four sweep files; the experiments keep their names (hence their
    default directories) and their hashes did not change (checked against the old files when they were merged)."""
    monkeypatch.chdir(REPO)
    names = {c.name for f in ("lottery_l1_resnet", "lottery_l1_vgg16", "lottery_resnet50", "lottery_vgg16")
             for c in load_experiments(f"configs/experiments/{f}.yaml")}
    expected = {f"lottery_l1_resnet{d}_{t}_lr{lr}" for d in (56, 110) for t in "ab" for lr in ("0.01", "0.1")}
    expected |= {f"lottery_{m}_lr{lr}" for m in ("l1_vgg16_a", "resnet50", "vgg16") for lr in ("0.01", "0.1")}
    assert names == expected
    (r110b,) = load_experiments("configs/experiments/lottery_l1_resnet.yaml", {"depth": "110", "target": "b",
                                                                               "lr": "0.1"})
    assert r110b.base == "configs/cifar/l1_resnet110.yaml" and r110b.args == ("--model.lr=0.1",)
    assert r110b.variants[0].method == "configs/methods/lottery_l1_resnet110_b.yaml"


def test_a_swept_prune_ratio_reaches_the_method(tmp_path: Path) -> None:
    """The planner passes a variant's method_args to ``lit_prune.prune``, which merges them into the method's
    init_args."""
    import json

    from lit_prune.protocol import Protocol
    from lit_prune.sources import load_method

    config = load_experiment(_write(tmp_path / "exp.yaml"))
    prunes = [s for s in Protocol(config, tmp_path / "out").plan() if s.kind == "prune"]
    args = [next(a for a in s.command if a.startswith("--method-args=")) for s in prunes]
    assert args == ['--method-args={"prune_ratio": 0.3}', '--method-args={"prune_ratio": 0.5}']
    method = load_method(METHOD, json.loads(args[1].split("=", 1)[1]))
    assert method.pruner.widths.prune_ratio == 0.5
    assert load_method(METHOD).pruner.widths.prune_ratio == 0.3  # the file itself is left alone


def test_rethink_runs_every_experiment_of_a_sweep_file_or_the_selected_ones(monkeypatch, capsys, tmp_path) -> None:
    from lit_prune.protocol.cli import main

    monkeypatch.chdir(REPO)
    assert main(["--config", "configs/experiments/lottery_l1_vgg16.yaml", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("seed 0 | large") == 2 and f"{tmp_path}/lottery_l1_vgg16_a_lr0.1/seed0" in printed
    assert main(["--config", "configs/experiments/lottery_l1_vgg16.yaml", "--select", "lr=0.1", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("seed 0 | large") == 1 and "runs/rethink/lottery_l1_vgg16_a_lr0.1/seed0" in printed
    assert main(["--config", "configs/experiments/lottery_l1_vgg16.yaml", "--select", "lr=0.5", "--dry-run"]) == 2
    assert "the axes' values: {'lr': ['0.01', '0.1']}" in capsys.readouterr().err
