"""The cross-experiment report (``lit_prune.protocol.compare``, ``python -m lit_prune.report``) on two tiny
'finished' runs whose stages logged their hyper-parameters to TensorBoard as lit_prune.stage does: the table's
means, stds and Welch p-values against a direct computation, the md/csv/tex files and the plot."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from scipy import stats

from lit_prune.protocol import RunLayout
from lit_prune.protocol.compare import load_run, read_hparams, rows
from lit_prune.report import main

ACC = {  # (variant, regime) -> accuracy per seed
    ("slim", "finetune"): [0.90, 0.91, 0.92], ("slim", "scratch_b"): [0.93, 0.94, 0.945],
    ("slim", "scratch_e"): [0.91, 0.915, 0.90], ("slim", "pruned"): [0.5, 0.4, 0.45],
    ("uniform", "scratch_e"): [0.88, 0.87, 0.885], ("uniform", "scratch_b"): [0.9, 0.91, 0.9],
}
LARGE = [0.95, 0.951, 0.949]


def _finished(root: Path, name: str, seeds: list[int]) -> Path:
    """An experiment directory as the runner leaves it: experiment.json and one TensorBoard run per stage with
    the stage's hyper-parameters and hp_metric (the calls of lit_prune.protocol.stage._log_hyperparameters)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    layout = RunLayout(root)
    config = {"name": name, "variants": [{"name": "slim", "method": "m.yaml"},
                                         {"name": "uniform", "uniform": {"of": "slim", "match": "params"}}],
              "paper": {"slim": {"scratch_b": "93.81 +-0.14 [M]"}}}
    root.mkdir(parents=True)
    (root / "experiment.json").write_text(json.dumps({"name": name, "hash": "x", "config": config}))
    stages = [(None, "large", LARGE)] + [(v, r, a) for (v, r), a in ACC.items()]
    for seed in seeds:
        for variant, kind, accs in stages:
            logger = TensorBoardLogger(save_dir=str(layout.tb), name=f"seed{seed}",
                                       version=layout.tb_version(variant, kind), default_hp_metric=False)
            params = 1000 if variant is None else 400 if variant == "slim" else 380
            logger.log_hyperparams({"seed": seed, "variant": variant or "unpruned", "regime": kind,
                                    "method": "network_slimming" if variant == "slim" else "uniform",
                                    "params": params, "macs": 10 * params},
                                   metrics={"hp_metric": accs[seed]})
            logger.finalize("success")
    return root


def test_the_report_computes_means_stds_and_welch_p_values(tmp_path: Path, capsys) -> None:
    three = _finished(tmp_path / "three", "three_seeds", [0, 1, 2])
    two = _finished(tmp_path / "two", "two_seeds", [0, 1])
    hp, metric = read_hparams(RunLayout(three).tb_run(1, "slim", "scratch_b"))
    assert hp["variant"] == "slim" and hp["regime"] == "scratch_b" and metric == pytest.approx(0.94)

    table, comparisons = rows([load_run(three), load_run(two)])
    slim = next(r for r in table if r.experiment == "three_seeds" and r.variant == "slim")
    sb, ft = [100 * a for a in ACC["slim", "scratch_b"]], [100 * a for a in ACC["slim", "finetune"]]
    assert slim.cells["scratch_b"].mean == pytest.approx(statistics.fmean(sb), abs=1e-4)
    assert slim.cells["scratch_b"].std == pytest.approx(statistics.stdev(sb), abs=1e-4)
    assert slim.cells["unpruned"].mean == pytest.approx(100 * statistics.fmean(LARGE), abs=1e-4)
    p = stats.ttest_ind(sb, ft, equal_var=False).pvalue
    assert slim.scratch_b_vs_finetune == f"p = {p:.3f}" + (" *" if p < 0.05 else "")
    assert next(r for r in table if r.experiment == "two_seeds" and r.variant == "slim").scratch_b_vs_finetune \
        == "n < 3 (n = 2, 2): no test"
    (uniform_e,) = [c for c in comparisons if c.experiment == "three_seeds" and c.regime == "scratch_e"]
    assert uniform_e.kind == "uniform" and uniform_e.of == "slim"
    assert uniform_e.p == pytest.approx(stats.ttest_ind([100 * a for a in ACC["uniform", "scratch_e"]],
                                                        [100 * a for a in ACC["slim", "scratch_e"]],
                                                        equal_var=False).pvalue, abs=1e-4)

    out = tmp_path / "report"
    assert main([str(three), str(two), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "[paper 93.81 +-0.14 [M]]" in md and f"p = {p:.3f}" in md and "| three_seeds | uniform | uniform |" in md
    assert md == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    records = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    row = next(r for r in records if r["experiment"] == "three_seeds" and r["variant"] == "uniform"
               and r["regime"] == "scratch_e")
    assert float(row["mean"]) == pytest.approx(100 * statistics.fmean(ACC["uniform", "scratch_e"]), abs=1e-3)
    assert float(row["params"]) == 380 and row["kind"] == "uniform"
    assert "\\begin{tabular}" in (out / "report.tex").read_text()
    assert (out / "efficiency.png").stat().st_size > 10_000


def test_the_report_refuses_what_is_not_a_finished_run(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is not an experiment directory" in capsys.readouterr().err
    (tmp_path / "experiment.json").write_text("{}")
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no finished stage with hyper-parameters" in capsys.readouterr().err
    assert main([str(tmp_path), "--format", "html"]) == 2
