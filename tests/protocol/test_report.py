"""Reporting (``lit_prune.protocol.report``) on stage metrics written by hand: the table's rows, the JSON, and
a plot that leaves matplotlib's global state alone. The end-to-end run (tests/protocol/test_run.py) checks
the same files against the metrics of real stages."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import yaml

from lit_prune.protocol import RunLayout, collect, load_experiment, plot, write_results

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def finished(tmp_path: Path):
    """A 2-seed, 2-variant experiment whose stages 'finished' with made-up metrics (no artifacts)."""
    config = tmp_path / "exp.yaml"
    method = str(REPO / "configs" / "methods" / "l1_quickstart.yaml")
    config.write_text(yaml.safe_dump({
        "name": "made_up", "base": str(REPO / "configs" / "quickstart.yaml"), "seeds": [0, 1],
        "variants": [{"name": "a", "method": method}, {"name": "b", "method": method}],
        "regimes": {"scratch_e": {}, "scratch_b": {}}, "paper": {"a": {"scratch_b": "93.05 [RW]"}}}, sort_keys=False))
    exp = load_experiment(config)
    layout = RunLayout(tmp_path / "out")
    for seed in exp.seeds:
        for v in exp.variants:
            for row in ("unpruned", "pruned", "scratch_e", "scratch_b"):
                d = layout.row_dir(seed, v.name, row)
                d.mkdir(parents=True, exist_ok=True)
                acc = 0.5 + 0.1 * seed + (0.01 if v.name == "b" else 0)
                epochs = {"pruned": 0, "scratch_b": 7}.get(row, 4)
                (d / "metrics.json").write_text(json.dumps({
                    "acc1": acc, "max_epochs": epochs, "wall_time_s": 10.0 + seed,
                    "milestones": [3, 5] if row == "scratch_b" else None, "macs": 100, "params": 10}))
    return exp, layout


def test_tables_from_the_stage_metrics(finished) -> None:
    exp, layout = finished
    results = collect(exp, layout)
    write_results(exp, layout, results)
    assert json.loads(layout.results_json.read_text()) == json.loads(json.dumps(results))
    rows = results["variants"]["a"]["rows"]
    assert list(rows) == ["unpruned", "pruned", "scratch_e", "scratch_b"]
    assert rows["scratch_e"]["acc1"] == pytest.approx([50.0, 60.0]) and rows["scratch_e"]["n"] == 2
    assert rows["scratch_b"]["paper"] == "93.05 [RW]" and rows["scratch_e"]["paper"] is None
    assert results["variants"]["a"]["flops"] is None  # no artifact
    assert results["data"] == "MNIST5k"  # the base config's datamodule, named in the plot's title
    table = layout.results_md.read_text()
    assert table.startswith("# made_up\n")
    assert "| Scratch-E | 55.00 ± 7.07 | 2 | 4 | 10 s |  |" in table
    assert "| Scratch-B | 55.00 ± 7.07 | 2 | 7 (LR steps [3, 5]) | 10 s | 93.05 [RW] |" in table
    assert "| Pruned (no retraining) | 56.00 ± 7.07 | 2 | 0 | 10 s |  |" in table  # variant b
    assert layout.results_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(layout.root.glob(".*tmp*"))


def test_plot_leaves_matplotlib_global_state_alone(finished, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    exp, layout = finished
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    one = {**collect(exp, layout), "variants": {"a": collect(exp, layout)["variants"]["a"]}}
    for results in (collect(exp, layout), one):  # two panels, one panel
        path = tmp_path / "plot.png"
        plot(results, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
