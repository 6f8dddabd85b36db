"""The cross-experiment report: finished experiment directories in the paper's table layout, the significance of
Scratch-B against fine-tuning and of every control against its method, and the parameter-efficiency plots of
Section 5.

What a stage measured is read from its TensorBoard run, the hyper-parameters every stage logs once with its
final test accuracy as ``hp_metric`` (:func:`lit_prune.protocol.stage._log_hyperparameters`: seed, variant,
regime, method, arch, params, MACs), so the report and TensorBoard's HParams tab cannot disagree; the
experiment's ``experiment.json`` says which variant is a control of which, and the paper's numbers.

Significance: Welch's t-test (unequal variances) over the seeds, ``p < 0.05`` marked with ``*``; with fewer than
three seeds on either side no p-value is given (the table says ``n < 3``).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_prune.protocol.layout import MARKER, RunLayout
from lit_prune.protocol.report import LABELS, efficiency_panel

FORMATS = ("md", "csv", "tex")
COLUMNS = ("unpruned", "pruned", "finetune", "scratch_e", "scratch_b")  # Table 1's, in its order
ALPHA = 0.05
MIN_SEEDS = 3


@dataclass
class Cell:
    """One (experiment, variant, regime): the accuracies of its seeds and the size of its model."""

    accs: dict[int, float] = field(default_factory=dict)  # seed -> test top-1 (%)
    params: list[float] = field(default_factory=list)
    macs: list[float] = field(default_factory=list)
    method: str = ""

    @property
    def n(self) -> int:
        return len(self.accs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs.values()) if self.n > 1 else 0.0

    def text(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n else ""


@dataclass
class Experiment:
    name: str
    root: Path
    config: dict[str, Any]
    cells: dict[str, dict[str, Cell]]  # variant -> regime -> cell ("unpruned": the large model)

    def kind(self, variant: str) -> tuple[str, str | None]:
        """``(kind, the variant it controls)``: method, uniform, random or guided."""
        v = next((v for v in self.config.get("variants", []) if v.get("name") == variant), {})
        for kind in ("uniform", "random"):
            if kind in v:
                return kind, v[kind]["of"]
        if "guided" in v:
            of = v["guided"].get("of") or []
            return "guided", of[0] if of else None
        return "method", None


# ---- reading -------------------------------------------------------------------------------------------
def read_hparams(run_dir: Path) -> tuple[dict[str, Any], float] | None:
    """The hyper-parameters and ``hp_metric`` of one TensorBoard run directory, or None (no hparams there)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    try:
        content = acc.PluginTagToContent("hparams")
    except KeyError:  # a run without hyper-parameters (the prune stage's)
        return None
    start = content.get("_hparams_/session_start_info")
    if start is None or "hp_metric" not in acc.Tags().get("scalars", []):
        return None
    info = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info
    params = {k: _value(v) for k, v in info.hparams.items()}
    return params, acc.Scalars("hp_metric")[-1].value


def _value(v: Any) -> Any:
    kind = v.WhichOneof("kind")
    return getattr(v, kind) if kind else None


def load_run(root: str | Path) -> Experiment:
    """One finished experiment directory.

    Raises:
        FileNotFoundError: no experiment.json (not an experiment directory) or no stage with hyper-parameters in
            its TensorBoard runs (not finished, or made before the stages logged them).
    """
    root = Path(root)
    marker = root / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{root} is not an experiment directory (no {MARKER}); give the --out of a "
                                "python -m lit_prune.rethink run")
    record = json.loads(marker.read_text())
    layout = RunLayout(root)
    cells: dict[str, dict[str, Cell]] = {}
    large: dict[int, tuple[dict[str, Any], float]] = {}
    runs = sorted({p.parent for p in layout.tb.rglob("events.out.tfevents.*")})
    for run in runs:
        found = read_hparams(run)
        if found is None:
            continue
        hp, acc = found
        if hp.get("regime") == "large" or hp.get("variant") == "unpruned":
            large[int(hp["seed"])] = (hp, acc)
            continue
        _add(cells.setdefault(str(hp["variant"]), {}).setdefault(str(hp["regime"]), Cell()), hp, acc)
    if not cells:
        raise FileNotFoundError(f"no finished stage with hyper-parameters in {layout.tb}; is the run finished?")
    for variant in cells:
        cells[variant]["unpruned"] = unpruned = Cell()
        for hp, acc in large.values():
            _add(unpruned, hp, acc)
    return Experiment(str(record.get("name", root.name)), root, record.get("config", {}), cells)


def _add(cell: Cell, hp: dict[str, Any], acc: float) -> None:
    cell.accs[int(hp["seed"])] = 100 * float(acc)
    for key, values in (("params", cell.params), ("macs", cell.macs)):
        if hp.get(key) is not None:
            values.append(float(hp[key]))
    cell.method = cell.method or str(hp.get("method", ""))


# ---- statistics ----------------------------------------------------------------------------------------
def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch's two-sided p-value of ``a`` against ``b``, None with fewer than three values on a side."""
    if len(a) < MIN_SEEDS or len(b) < MIN_SEEDS:
        return None
    from scipy import stats

    return float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)


def _p_text(p: float | None, a: Cell, b: Cell) -> str:
    if p is None:
        return f"n < {MIN_SEEDS} (n = {a.n}, {b.n}): no test"
    return f"p = {p:.3f}" + (" *" if p < ALPHA else "")


@dataclass(frozen=True)
class Row:
    experiment: str
    variant: str
    kind: str
    cells: dict[str, Cell]
    paper: dict[str, str]
    scratch_b_vs_finetune: str


@dataclass(frozen=True)
class Comparison:
    experiment: str
    control: str
    kind: str
    of: str
    regime: str
    control_cell: Cell
    method_cell: Cell
    p: float | None


def rows(experiments: Iterable[Experiment]) -> tuple[list[Row], list[Comparison]]:
    """Table 1's rows (one per variant) and every control against its method in each regime both trained."""
    table, comparisons = [], []
    for exp in experiments:
        paper = exp.config.get("paper") or {}
        for variant, cells in exp.cells.items():
            kind, of = exp.kind(variant)
            ft, sb = cells.get("finetune"), cells.get("scratch_b")
            test = _p_text(welch(list(sb.accs.values()), list(ft.accs.values())), sb, ft) if ft and sb else ""
            table.append(Row(exp.name, variant, kind, cells, dict(paper.get(variant) or {}), test))
            if of is None or of not in exp.cells:
                continue
            for regime, cell in cells.items():
                if regime in ("unpruned", "pruned") or regime not in exp.cells[of]:
                    continue
                method = exp.cells[of][regime]
                comparisons.append(Comparison(exp.name, variant, kind, of, regime, cell, method,
                                              welch(list(cell.accs.values()), list(method.accs.values()))))
    return table, comparisons


def _regimes(table: Sequence[Row]) -> list[str]:
    extra = dict.fromkeys(r for row in table for r in row.cells if r not in COLUMNS)
    return [*COLUMNS, *extra]


def _size(cells: dict[str, Cell], key: str) -> str:
    values = [x for regime, c in cells.items() if regime != "unpruned" for x in getattr(c, key)]
    return f"{statistics.fmean(values):,.0f}" if values else ""


# ---- formats -------------------------------------------------------------------------------------------
def markdown(table: Sequence[Row], comparisons: Sequence[Comparison]) -> str:
    regimes = _regimes(table)
    head = ["experiment", "model", "kind", "params", "MACs", *(LABELS.get(r, r) for r in regimes),
            "Scratch-B vs fine-tuned"]
    lines = ["Final-epoch test top-1 accuracy (%), mean ± std over seeds; the paper's number in brackets. "
             f"Welch's t-test over seeds, * where p < {ALPHA} (no test with fewer than {MIN_SEEDS} seeds).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = []
        for r in regimes:
            c = row.cells.get(r)
            text = c.text() if c else ""
            if row.paper.get(r):
                text += f" [paper {row.paper[r]}]"
            cells.append(text)
        lines.append("| " + " | ".join([row.experiment, row.variant, row.kind, _size(row.cells, "params"),
                                        _size(row.cells, "macs"), *cells, row.scratch_b_vs_finetune]) + " |")
    if comparisons:
        lines += ["", "Controls against their method (Section 5): the same regime, Welch's t-test over seeds.", "",
                  "| experiment | control | kind | of | regime | control | method | difference | test |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c.experiment} | {c.control} | {c.kind} | {c.of} | {LABELS.get(c.regime, c.regime)} | "
                         f"{c.control_cell.text()} | {c.method_cell.text()} | "
                         f"{c.control_cell.mean - c.method_cell.mean:+.2f} | "
                         f"{_p_text(c.p, c.control_cell, c.method_cell)} |")
    return "\n".join(lines) + "\n"


def csv_text(table: Sequence[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["experiment", "variant", "kind", "regime", "method", "n", "mean", "std", "params", "macs",
                     "accuracies", "paper"])
    for row in table:
        for regime, c in row.cells.items():
            writer.writerow([row.experiment, row.variant, row.kind, regime, c.method, c.n, f"{c.mean:.4f}",
                             f"{c.std:.4f}", statistics.fmean(c.params) if c.params else "",
                             statistics.fmean(c.macs) if c.macs else "",
                             " ".join(f"{a:.4f}" for _, a in sorted(c.accs.items())), row.paper.get(regime, "")])
    return out.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def tex(table: Sequence[Row]) -> str:
    regimes = _regimes(table)
    lines = ["\\begin{tabular}{ll" + "c" * len(regimes) + "}", "\\toprule",
             " & ".join(["Experiment", "Model", *(LABELS.get(r, r) for r in regimes)]) + " \\\\", "\\midrule"]
    for row in table:
        cells = []
        for r in regimes:
            c = row.cells.get(r)
            cells.append(f"${c.mean:.2f} \\pm {c.std:.2f}$" if c else "")
        lines.append(" & ".join([_tex(row.experiment), _tex(row.variant), *cells]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# ---- plots ---------------------------------------------------------------------------------------------
def efficiency_plot(experiments: Sequence[Experiment], path: Path) -> None:
    """Accuracy against parameters and against FLOPs: one line per (kind, regime) of every experiment (method,
    uniform, guided, random control), a point per variant, the unpruned model as the reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs (conv + linear)")):
        series: dict[str, list[tuple[float, float, float]]] = {}
        reference = None
        for exp in experiments:
            for variant, cells in exp.cells.items():
                kind, _ = exp.kind(variant)
                for regime, c in cells.items():
                    sizes = getattr(c, key)
                    if not sizes or not c.n or regime == "pruned":  # not retrained: not an architecture's worth
                        continue
                    point = (statistics.fmean(sizes), c.mean, c.std)
                    if regime == "unpruned":
                        reference = reference or point
                        continue
                    label = f"{c.method if kind == 'method' else kind} ({LABELS.get(regime, regime)})"
                    if len(experiments) > 1:
                        label = f"{exp.name}: {label}"
                    series.setdefault(label, []).append(point)
        efficiency_panel(ax, series, reference, xlabel, f"accuracy against {xlabel.split(' ')[0]}")
        ax.set_xscale("log")
    n = max((c.n for e in experiments for cells in e.cells.values() for c in cells.values()), default=0)
    fig.suptitle(f"{', '.join(e.name for e in experiments)}: mean ± std over {n} seed{'s' if n != 1 else ''}",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def write_report(runs: Sequence[str | Path], out: str | Path, formats: Sequence[str] = FORMATS,
                 plot: bool = True) -> dict[str, Path]:
    """Read ``runs``, write ``report.<fmt>`` for each format and ``efficiency.png`` into ``out``; returns the files.

    Raises:
        ValueError: an unknown format.
        FileNotFoundError: a run that is not a finished experiment directory.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    experiments = [load_run(r) for r in runs]
    table, comparisons = rows(experiments)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"md": lambda: markdown(table, comparisons), "csv": lambda: csv_text(table), "tex": lambda: tex(table)}
    written = {}
    for fmt in formats:
        path = out / f"report.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(texts[fmt]())
        tmp.replace(path)
        written[fmt] = path
    if plot:
        written["png"] = out / "efficiency.png"
        efficiency_plot(experiments, written["png"])
    return written
