"""The experiment config (``lit_prune.protocol.config``): the schema refused key by key, the hash over every
file the config names, and the epochs and milestones of a stage read from its resolved train.py config."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from lit_prune.protocol import ExperimentError, Protocol, config_hash, load_experiment
from lit_prune.protocol.config import load_experiments

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
BASE = str(REPO / "configs" / "quickstart.yaml")
METHOD = str(REPO / "configs" / "methods" / "l1_quickstart.yaml")


def _write(path: Path, **overrides) -> Path:
    exp = {"name": "tiny", "base": BASE, "seeds": [0], "args": ["--trainer.max_epochs=3"],
           "variants": [{"name": "l1", "method": METHOD}],
           "regimes": {"finetune": {"args": ["--trainer.max_epochs=1"]}, "scratch_e": {}, "scratch_b": {}}}
    exp.update(overrides)
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def _stages(config: Path, tmp_path: Path) -> dict[str, object]:
    return {s.kind: s for s in Protocol(load_experiment(config), tmp_path / "out").plan() if s.seed == 0}


# ---- the schema ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"nmae": "x"}, r"unknown keys \['nmae'\]; known: \['args', 'base'"),
    ({"large": {"checkpiont": "x.ckpt"}}, r"large: unknown keys \['checkpiont'\]; known: \['arch', 'args', "
                                          r"'checkpoint', 'weights'\]"),
    ({"regimes": {"finetune": {"arg": ["--model.lr=0.01"]}}},
     r"regimes.finetune: unknown keys \['arg'\]; known: \['args', 'budget', 'cap', 'convention', 'regime', "
     r"'rule', 'sweep'\]"),
    ({"variants": [{"name": "l1", "method": METHOD, "widht_config": "a"}]},
     r"variants\[0\]: unknown keys \['widht_config'\]; known: \['arch', 'from_training', 'guided', 'method', "
     r"'method_args', 'name', 'random', 'regimes', 'source', 'sweep', 'uniform', 'width_config'\]"),
    ({"variants": [{"name": "a", "method": METHOD}, {"name": "b", "method": METHOD,
                                                     "source": {"variant": "a", "regime": "finetune", "round": 2}}]},
     r"variant 'b': source: unknown keys \['round'\]"),
    ({"paper": {"l1": {"scratch_c": "93.0"}}}, r"paper.l1: unknown keys \['scratch_c'\]"),
    ({"paper": {"l2": {"unpruned": "93.0"}}}, r"paper: unknown variants \['l2'\]; known: \['l1'\]"),
    ({"args": "--trainer.max_epochs=3"}, r"args must be a list of train.py arguments"),
    ({"large": {"args": "--config=x.yaml"}}, r"large.args must be a list"),
    ({"regimes": {"scratch_e": {"args": "--trainer.devices=2"}}}, r"regimes.scratch_e.args must be a list"),
    ({"seeds": []}, r"seeds must be a non-empty list of integers, got \[\]"),
    ({"seeds": [0, 1, 0]}, r"seeds must be distinct \(each seed has its own directory\), got \[0, 1, 0\]"),
    ({"seeds": 3}, r"seeds must be a non-empty list of integers, got 3"),
    ({"seeds": ["0"]}, r"seeds must be a non-empty list of integers"),
    ({"large": ["x"]}, r"large must be a mapping"),
    ({"variants": [{"name": "large", "method": METHOD}]}, r"variant 'large' is not a valid name"),
    ({"variants": [{"name": "a/b", "method": METHOD}]}, r"variant 'a/b' is not a valid name"),
    ({"regimes": {"pruned": {"regime": "scratch"}}}, r"regime 'pruned' is not a valid name"),
    ({"variants": [{"name": "l1", "method": METHOD}, {"name": "l1", "method": METHOD}]},
     r"every variant needs a unique name, got \['l1', 'l1'\]"),
    ({"regimes": {"extra": {}}}, r"regime 'extra' needs 'regime: finetune \| scratch \| rewind'"),
    ({"regimes": {"scratch_b": {"cap": 0.5}}}, r"the Scratch-B cap must be >= 1"),
    ({"regimes": {"scratch_b": {"rule": "halves"}}}, r"rule must be one of fractions, thirds, scale, multiples"),
    ({"regimes": {"scratch_b": {"convention": "flops"}}}, r"regime 'scratch_b': convention must be one of macs, "
                                                          r"reference \(the FLOPs counted for Scratch-B's ratio\)"),
    ({"regimes": {"scratch_e": {"convention": "reference"}}}, r"convention is the FLOPs convention of a compute "
                                                              r"budget \(Scratch-B\); this regime has budget 'same'"),
    ({"large": {"weights": "r50.pth"}}, r"large.weights needs large.arch"),
    ({"large": {"args": ["--config=missing.yaml"]}}, r"large.args: --config missing.yaml does not exist"),
    ({"variants": [{"name": "l1", "method": "missing.yaml"}]}, r"method config missing.yaml does not exist"),
    ({"variants": [{"name": "l1"}]}, r"variant 'l1' needs one of 'method'"),
])
def test_schema_errors_name_the_key(overrides: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=message):
        load_experiment(_write(tmp_path / "exp.yaml", **overrides))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_shipped_config_loads_with_its_files_read_once(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    for config in load_experiments(path.relative_to(REPO)):  # a sweep file: each of its experiments
        assert list(config.files)[0] == config.base and config.base in config.docs
        for _, args in config.all_args():
            for arg in args:
                if arg.startswith("--config="):
                    assert arg.split("=", 1)[1] in config.files


# ---- the hash ----------------------------------------------------------------------------------------

def test_hash_covers_the_config_files_named_in_args(tmp_path: Path) -> None:
    callback = tmp_path / "callback.yaml"
    callback.write_text("model:\n  lr: 0.1\n")
    regime = tmp_path / "regime.yaml"
    regime.write_text("model:\n  lr: 0.01\n")
    config = _write(tmp_path / "exp.yaml", large={"args": [f"--config={callback}"]},
                    regimes={"finetune": {"args": ["--config", str(regime)]}, "scratch_e": {}})
    first = load_experiment(config)
    assert load_experiment(config).hash == first.hash == config_hash(first)  # stable
    assert first.arg_files == [str(callback), str(regime)]
    callback.write_text("model:\n  lr: 0.2\n")
    second = load_experiment(config)
    assert second.hash != first.hash
    assert {f for f in first.file_digests() if first.file_digests()[f] != second.file_digests()[f]} == {str(callback)}
    regime.write_text("model:\n  lr: 0.02\n")
    assert load_experiment(config).hash not in (first.hash, second.hash)
    # what the old hash covered is still covered: the config itself, the base and the method configs
    assert load_experiment(_write(tmp_path / "exp.yaml", seeds=[1])).hash != first.hash


def test_legacy_hash_is_the_hash_of_the_previous_version(tmp_path: Path, monkeypatch) -> None:
    """``legacy_hash`` reproduces what lit-prune wrote into experiment.json before the hash covered the files
    named in args (the function below is the old ``config_hash``), so that such a directory is recognised."""
    monkeypatch.chdir(REPO)
    import hashlib
    import json

    def old_hash(path: Path) -> str:
        exp = yaml.safe_load(path.read_text())
        exp.setdefault("seeds", [0])
        exp.setdefault("args", [])
        exp.setdefault("large", {})
        exp.setdefault("regimes", {r: {} for r in ("finetune", "scratch_e", "scratch_b")})
        defaults = {"finetune": {"regime": "finetune", "budget": "same"},
                    "scratch_e": {"regime": "scratch", "budget": "same"},
                    "scratch_b": {"regime": "scratch", "budget": "compute"}}
        exp["regimes"] = {k: {**defaults.get(k, {}), **(cfg or {})} for k, cfg in exp["regimes"].items()}
        for v in exp["variants"]:
            v["name"] = str(v["name"])
        h = hashlib.sha256(json.dumps({k: v for k, v in exp.items() if k not in ("paper", "out")}, sort_keys=True,
                                      default=str).encode())
        for f in [exp["base"]] + [v["method"] for v in exp["variants"] if v.get("method")]:
            h.update(Path(f).read_bytes())
        return h.hexdigest()[:16]

    for path in (REPO / "configs" / "experiments" / "quickstart.yaml", REPO / "configs" / "experiments" /
                 "quickstart_lottery.yaml", _write(tmp_path / "exp.yaml", seeds=[3, 4])):
        config = load_experiment(path)
        assert config.legacy_hash == old_hash(path) != config.hash


# ---- epochs and milestones from the resolved stage config -------------------------------------------

def test_epochs_come_from_a_config_named_in_args(tmp_path: Path) -> None:
    epochs5 = tmp_path / "epochs5.yaml"
    epochs5.write_text("trainer:\n  max_epochs: 5\nmodel:\n  milestones: [2, 4]\n")
    config = _write(tmp_path / "exp.yaml", args=[f"--config={epochs5}"],
                    regimes={"finetune": {"args": ["--trainer.max_epochs=1"]}, "scratch_e": {}})
    protocol = Protocol(load_experiment(config), tmp_path / "out")
    stages = {s.kind: s for s in protocol.plan() if s.seed == 0}
    assert protocol.epochs == stages["large"].epochs == stages["scratch_e"].epochs == 5
    assert stages["finetune"].epochs == 1
    assert protocol.planner.large.milestones == [2, 4]


def test_later_arguments_override_earlier_ones_as_in_lightningcli(tmp_path: Path) -> None:
    epochs5 = tmp_path / "epochs5.yaml"
    epochs5.write_text("trainer:\n  max_epochs: 5\n")
    trainer7 = tmp_path / "trainer7.yaml"  # a group's own config file: --trainer FILE
    trainer7.write_text("max_epochs: 7\n")
    config = load_experiment(_write(tmp_path / "exp.yaml", args=[]))
    assert config.resolve([]).max_epochs == yaml.safe_load(Path(BASE).read_text())["trainer"]["max_epochs"]
    config = load_experiment(_write(tmp_path / "exp.yaml", args=["--trainer.max_epochs=3", f"--config={epochs5}"],
                                    large={"args": ["--trainer", str(trainer7)]},
                                    regimes={"scratch_e": {"args": ["--trainer.max_epochs", "2"]}}))
    assert config.resolve(config.args).max_epochs == 5  # the --config after the flag wins
    assert config.resolve([*config.args, *config.large.args]).max_epochs == 7
    assert config.resolve([*config.args, *config.regimes["scratch_e"].args]).max_epochs == 2
    assert config.resolve(["--model.milestones=[3, 6]"]).milestones == [3, 6]
    assert str(trainer7) in config.files  # and hashed


def test_a_large_model_config_in_large_args_sets_scratch_b_s_budget(tmp_path: Path) -> None:
    """The large model trains for the epochs of its --config (large.args): Scratch-B stretches those."""
    long = tmp_path / "long.yaml"
    long.write_text("trainer:\n  max_epochs: 6\n")
    protocol = Protocol(load_experiment(_write(tmp_path / "exp.yaml", large={"args": [f"--config={long}"]})),
                        tmp_path / "out")
    large = next(s for s in protocol.plan() if s.kind == "large")
    assert protocol.epochs == large.epochs == 6
    assert protocol.planner.pending_note().startswith("epochs = int(6 * r)")


@pytest.mark.parametrize("where", ["args", "large", "regime"])
@pytest.mark.parametrize("flag", ["--trainer.max_epoch=1", "--trainer.max_ep=1", "--model.milestone=[1]",
                                  "--model.milestones+=4", "--conf=x.yaml"])
def test_abbreviated_options_the_runner_reads_are_refused(flag: str, where: str, tmp_path: Path) -> None:
    """argparse (hence LightningCLI) takes ``--trainer.max_epoch=1`` as ``--trainer.max_epochs=1``: a runner that
    did not would plan Scratch-E/B for other epochs than the stage trains."""
    overrides = {"args": {"args": [flag]}, "large": {"large": {"args": [flag]}},
                 "regime": {"regimes": {"scratch_e": {"args": [flag]}}}}[where]
    full = flag.split("=")[0]
    with pytest.raises(ExperimentError, match=re.escape(full) + " abbreviates --"):
        load_experiment(_write(tmp_path / "exp.yaml", **overrides))


def test_other_abbreviations_and_full_options_pass(tmp_path: Path) -> None:
    config = load_experiment(_write(tmp_path / "exp.yaml", args=["--trainer.max_epochs=3", "--trainer.dev=1",
                                                                 "--model.lr=0.1", "--model.arch=cifar_vgg11"]))
    assert config.resolve(config.args).max_epochs == 3 and config.resolve(config.args).arch == "cifar_vgg11"


def test_a_base_without_epochs_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    doc = yaml.safe_load(Path(BASE).read_text())
    del doc["trainer"]["max_epochs"]
    base.write_text(yaml.safe_dump(doc))
    with pytest.raises(ExperimentError, match="sets no trainer.max_epochs"):
        load_experiment(_write(tmp_path / "exp.yaml", base=str(base), args=[]))
    assert load_experiment(_write(tmp_path / "exp.yaml", base=str(base), args=["--trainer.max_epochs=2"]))


def test_the_runner_imports_neither_torch_nor_lightning() -> None:
    code = ("import sys, lit_prune.rethink, lit_prune.protocol.cli; "
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'matplotlib') if m in sys.modules))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
    assert importlib.util.find_spec("lit_prune.protocol.stage") is not None


def test_scratch_b_convention_defaults_to_macs_and_only_reference_enters_the_hash(tmp_path: Path) -> None:
    plain = load_experiment(_write(tmp_path / "a.yaml"))
    macs = load_experiment(_write(tmp_path / "b.yaml", regimes={"scratch_b": {"convention": "macs"}}))
    ref = load_experiment(_write(tmp_path / "c.yaml", regimes={"scratch_b": {"convention": "reference"}}))
    assert plain.regimes["scratch_b"].convention == "macs" and ref.regimes["scratch_b"].convention == "reference"
    assert "convention" not in plain.to_dict()["regimes"]["scratch_b"]  # directories made before it keep their hash
    assert ref.to_dict()["regimes"]["scratch_b"]["convention"] == "reference"
    only_b = {k: v for k, v in plain.to_dict().items() if k != "regimes"}
    assert {k: v for k, v in macs.to_dict().items() if k != "regimes"} == only_b
    assert macs.to_dict()["regimes"]["scratch_b"] == {"regime": "scratch", "budget": "compute", "rule": "fractions",
                                                      "cap": None, "args": []}
    assert config_hash(ref) != config_hash(macs)


# SSS trained in MXNet: its Scratch-B schedule (docs/paper-settings.md §1.3) does not come from a compute_flops.py
@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not p.stem.startswith(("quickstart", "sss_"))],
                         ids=lambda p: p.stem)
def test_paper_configs_compute_scratch_b_with_the_reference_convention(path: Path, monkeypatch) -> None:
    """The paper's epochs came from its reference counters (docs/paper-settings.md §1.3-1.4); tables keep quoting
    MACs."""
    monkeypatch.chdir(REPO)
    for exp in load_experiments(path.relative_to(REPO)):
        assert all(r.convention == "reference" for r in exp.regimes.values() if r.compute)
