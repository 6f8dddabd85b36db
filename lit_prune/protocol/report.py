"""Collection and reporting: every stage's metrics into ``results.json``, ``results.md`` and ``results.png``.

Tables report the final-epoch test accuracy, mean ± std over seeds, with rows for the unpruned model,
the pruned model before retraining and every regime.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lit_prune.protocol.config import ExperimentConfig
from lit_prune.protocol.layout import RunLayout, read_metrics

LABELS = {"unpruned": "Unpruned", "pruned": "Pruned (no retraining)", "finetune": "Fine-tuned",
          "scratch_e": "Scratch-E", "scratch_b": "Scratch-B"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(config: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
    """Gather every stage's metrics into ``{variant: {row: {...}}}``."""
    from lit_prune.artifact import load_artifact

    results: dict[str, Any] = {"name": config.name, "seeds": list(config.seeds), "data": _data_name(config),
                               "variants": {}}
    for v in config.variants:
        rows: dict[str, Any] = {}
        for row in ("unpruned", "pruned", *config.regimes):
            per_seed = [m for m in (read_metrics(layout.row_dir(seed, v.name, row)) for seed in config.seeds)
                        if m is not None]
            if not per_seed:
                continue
            accs = [100 * m["acc1"] for m in per_seed]
            mean, std = _mean_std(accs)
            rows[row] = {
                "acc1_mean": mean, "acc1_std": std, "n": len(accs), "acc1": accs,
                # global-threshold methods can give each seed its own width, hence its own Scratch-B budget
                "epochs": sorted({m["max_epochs"] for m in per_seed}),
                "milestones": per_seed[0].get("milestones"),
                "macs": per_seed[0].get("macs"), "params": per_seed[0].get("params"),
                "wall_time_s": statistics.fmean(m["wall_time_s"] for m in per_seed),
                "paper": config.paper.get(v.name, {}).get(row),
            }
        art_path = layout.artifact(config.seeds[0], v.name)
        flops = load_artifact(art_path).flops.to_dict() if art_path.is_file() else None  # results.json: plain data
        results["variants"][v.name] = {"rows": rows, "flops": flops}
    return results


def _data_name(config: ExperimentConfig) -> str:
    """The base config's data, as a reader names it: its ``dataset`` argument, else its datamodule's class."""
    data = (config.docs.get(config.base) or {}).get("data") or {}
    args = data.get("init_args") or {}
    return str(args.get("dataset") or str(data.get("class_path", "")).rpartition(".")[2].removesuffix("DataModule"))


def results_table(config: ExperimentConfig, results: dict[str, Any]) -> str:
    """``results.md``: per variant its size and one row per stage kind."""
    lines = [f"# {config.name}", "",
             f"Final-epoch test top-1 accuracy (%), mean ± std over seeds {list(config.seeds)}.", ""]
    for name, v in results["variants"].items():
        f = v["flops"]
        if f:
            lines.append(f"**{name}**: {f['pruned']['macs']:,} MACs, {f['pruned']['params']:,} params "
                         f"(unpruned {f['dense']['macs']:,} MACs, {f['dense']['params']:,} params; "
                         f"FLOPs ratio r = {f['ratio']:.3f})")
            lines.append("")
        lines += ["| | accuracy | n | epochs | wall time / seed | paper |", "|---|---|---|---|---|---|"]
        for row, r in v["rows"].items():
            regime = config.regimes.get(row)
            ms = f" (LR steps {r['milestones']})" if regime is not None and regime.compute and len(
                r["epochs"]) == 1 and r.get("milestones") else ""
            lines.append(f"| {LABELS.get(row, row)} | {r['acc1_mean']:.2f} ± {r['acc1_std']:.2f} | {r['n']} | "
                         f"{'/'.join(map(str, r['epochs']))}{ms} | {r['wall_time_s']:.0f} s | {r['paper'] or ''} |")
        lines.append("")
        note = _pruned_note(v)
        if note:
            lines += [note, ""]
    return "\n".join(lines)


def _pruned_note(variant: dict[str, Any]) -> str | None:
    """What the "Pruned (no retraining)" row is, with its drop from the unpruned model, when both ran."""
    rows, f = variant["rows"], variant["flops"]
    if "pruned" not in rows or "unpruned" not in rows:
        return None
    drop = rows["unpruned"]["acc1_mean"] - rows["pruned"]["acc1_mean"]
    cut = f" removes {100 * (1 - 1 / f['ratio']):.0f}% of the MACs at once and" if f and f["ratio"] > 0 else ""
    return (f"*{LABELS['pruned']}* is the pruned model tested as pruning left it, before any training: "
            f"{drop:.1f} points below the unpruned model. Pruning{cut} takes away what the removed channels "
            "computed; that drop is expected, and it is what fine-tuning starts from (Scratch-E/B do not use "
            "these weights at all).")


def write_results(config: ExperimentConfig, layout: RunLayout, results: dict[str, Any]) -> None:
    from lit_prune.io import atomic_save_json

    atomic_save_json(results, layout.results_json)
    tmp = layout.results_md.with_name(f".{layout.results_md.name}.tmp")
    tmp.write_text(results_table(config, results))
    tmp.replace(layout.results_md)
    plot(results, layout.results_png)


def efficiency_panel(ax: Any, series: dict[str, list[tuple[float, float, float]]],
                     reference: tuple[float, float, float] | None, xlabel: str, title: str) -> None:
    """Accuracy against a model size: one line per series of ``(size, mean, std)`` points (sorted by size), the
    unpruned model as a grey star with a dotted line at its accuracy. Shared by the runner's plot and the
    cross-experiment report's parameter-efficiency plots (:mod:`lit_prune.protocol.compare`)."""
    for label, points in series.items():
        pts = sorted(points)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o", capsize=3,
                        label=label)
    if reference is not None:
        ax.errorbar([reference[0]], [reference[1]], [reference[2]], marker="*", markersize=10, color="0.4",
                    linestyle="none", capsize=3, label="unpruned")
        ax.axhline(reference[1], color="0.6", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # nothing to show without the sizes (the variants' artifacts)
        ax.legend(fontsize=8)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy per regime with error bars; accuracy against FLOPs when several variants ran.

    Draws on its own ``Figure`` (Agg canvas): matplotlib's global backend and pyplot's figures are left alone.
    """
    from matplotlib.figure import Figure

    variants = results["variants"]
    rows_all = list(dict.fromkeys(r for v in variants.values() for r in v["rows"]))
    shared = [r for r in ("unpruned",) if r in rows_all]  # one large model per seed: one bar, not one per variant
    per_variant = [r for r in rows_all if r not in shared]
    slots = shared + per_variant
    several = len(variants) > 1
    fig = Figure(figsize=(11 if several else 6.5, 4.4))
    axes = fig.subplots(1, 2 if several else 1, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(variants), 1)
    first = next(iter(variants.values()))
    for r in shared:  # drawn once, in grey
        row = first["rows"][r]
        bars = ax.bar([slots.index(r) + 0.4 - width / 2], [row["acc1_mean"]], 0.8, yerr=[row["acc1_std"]], capsize=3,
                      color="0.6", label="unpruned (large model)")
        ax.bar_label(bars, labels=[f"{row['acc1_mean']:.2f}"], fontsize=7, padding=2)
    # zoom on the trained models; the pruned-but-not-retrained bar falls far below: it is marked at the bottom
    accs = [r["acc1_mean"] for v in variants.values() for k, r in v["rows"].items() if k != "pruned"]
    low, high = (max(0.0, min(accs) - 3), min(100.0, max(accs) + 1.5)) if accs else (0.0, 100.0)
    for j, (name, v) in enumerate(variants.items()):
        rows = [r for r in per_variant if r in v["rows"]]
        xs = [slots.index(r) + j * width for r in rows]
        means = [v["rows"][r]["acc1_mean"] for r in rows]
        bars = ax.bar(xs, means, width, yerr=[v["rows"][r]["acc1_std"] for r in rows], capsize=3, label=name)
        ax.bar_label(bars, labels=[f"{m:.2f}" if m >= low else "" for m in means], fontsize=7, padding=2)
        for x, m in zip(xs, means, strict=True):
            if m < low:  # below the zoomed axis: say where it is instead of leaving an empty slot
                ax.annotate(f"{m:.1f}", (x, low), xytext=(0, 8), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7, arrowprops={"arrowstyle": "->", "lw": 0.8})
    below = {r for v in variants.values() for r, row in v["rows"].items() if row["acc1_mean"] < low}
    names = [LABELS.get(r, r) + ("\n(below the axis)" if r in below else "") for r in slots]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(slots))], names, rotation=20, fontsize=8)
    ax.set_ylim(low, high)
    ax.set_ylabel("test top-1 accuracy (%)" + (f"\n(axis from {low:.0f}%, not 0)" if low > 0 else ""))
    n = max((row["n"] for v in variants.values() for row in v["rows"].values()), default=0)
    data = f"{results['data']}, " if results.get("data") else ""
    ax.set_title(f"{results['name']}: {data}mean ± std over {n} seed{'s' if n != 1 else ''}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(len(variants) + len(shared), 4), fontsize=8)
    if several:
        series = {LABELS.get(regime, regime): [
            (v["flops"]["pruned"]["macs"], v["rows"][regime]["acc1_mean"], v["rows"][regime]["acc1_std"])
            for v in variants.values() if v["flops"] and regime in v["rows"]]
            for regime in per_variant if regime != "pruned"}
        flops = next((v["flops"] for v in variants.values() if v["flops"]), None)
        reference = None
        if shared and flops:  # the large model as the reference point
            row = first["rows"]["unpruned"]
            reference = (flops["dense"]["macs"], row["acc1_mean"], row["acc1_std"])
        efficiency_panel(axes[0][1], series, reference, "MACs of the model", "accuracy against FLOPs")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
