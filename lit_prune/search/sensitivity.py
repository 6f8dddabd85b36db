"""Li et al.'s per-layer sensitivity analysis ("Pruning Filters for Efficient ConvNets", ICLR 2017, Figure 2),
which the paper's L1-norm targets and skip lists came from: prune each conv-produced channel group alone, by
filter L1 norm, at each ratio, and measure the accuracy without retraining.

The table is written after every layer (atomically), so a scan that stops resumes with the next layer. A layer
is *sensitive* when pruning ``probe`` of it costs more than ``tolerance`` points of accuracy; the scan proposes
the method config that follows: ``skip`` the sensitive layers, and prune every other one by the largest ratio it
tolerates (``prune_ratio`` per layer).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune.core.groups import channel_groups, group_size
from lit_prune.core.importance import group_scores
from lit_prune.core.selection import top_k
from lit_prune.core.surgery import prune_groups
from lit_prune.io import atomic_save_json

Evaluate = Callable[[nn.Module], float]  # the model's accuracy (%), without retraining


def prune_one(model: nn.Module, group: str, ratio: float, criterion: str = "l1") -> nn.Module:
    """A copy of ``model`` with ``int(C * (1 - ratio))`` filters of ``group`` kept (at least one), by norm."""
    pruned = copy.deepcopy(model)
    g = next(g for g in channel_groups(pruned) if g.name == group)
    keep = max(1, int(group_size(pruned, g) * (1 - ratio)))
    prune_groups(pruned, {group: top_k(group_scores(pruned, g, criterion), keep)})
    return pruned


def scan(model: nn.Module, evaluate: Evaluate, ratios: Sequence[float], path: str | Path, *,
         criterion: str = "l1", source: str = "", progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Scan every conv-produced group of ``model`` at every ratio, resuming from the table at ``path``.

    Under DDP every rank scans (``evaluate`` reduces the counts over the ranks, so all hold the same table) and
    only rank 0 passes ``write=True``.

    Raises:
        ValueError: the table at ``path`` was made for other ratios, another criterion or another model.
    """
    path = Path(path)
    groups = [g.name for g in channel_groups(model) if g.conv is not None]
    table: dict[str, Any] = {"source": source, "criterion": criterion, "ratios": list(ratios), "layers": {}}
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("source", "criterion", "ratios"):
            if old.get(key) != table[key]:
                raise ValueError(f"{path} holds a scan with {key} {old.get(key)!r}, not {table[key]!r}; use another "
                                 "--out or delete it to start over")
        table = old
    if "baseline" not in table:
        table["baseline"] = float(evaluate(model))
        if write:
            atomic_save_json(table, path)
    todo = [g for g in groups if g not in table["layers"]]
    bar = _bar(len(todo) * len(ratios), progress)
    for name in todo:
        accs = {}
        for r in ratios:
            accs[str(r)] = float(evaluate(prune_one(model, name, r, criterion)))
            bar.update(1)
        table["layers"][name] = accs
        if write:
            atomic_save_json(table, path)  # resumable layer by layer
    bar.close()
    return table


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="sensitivity", unit="prune", disable=not enabled or total == 0)


def proposal(table: dict[str, Any], probe: float = 0.5, tolerance: float = 1.0) -> dict[str, Any]:
    """The sensitive layers and the method config that follows from ``table`` (see the module docstring)."""
    base = table["baseline"]
    ratios = [float(r) for r in table["ratios"]]
    probe_key = str(min(ratios, key=lambda r: abs(r - probe)))
    sensitive = [n for n, accs in table["layers"].items() if base - accs[probe_key] > tolerance]
    per_layer = {}
    for name, accs in table["layers"].items():
        if name in sensitive:
            continue
        ok = [r for r in ratios if base - accs[str(r)] <= tolerance]
        if ok:
            per_layer[name] = max(ok)
    return {"sensitive": sensitive, "probe": float(probe_key), "tolerance": tolerance,
            "init_args": {"prune_ratio": per_layer, "skip": sensitive} if per_layer else {"skip": sensitive}}


def plot(table: dict[str, Any], sensitive: Sequence[str], path: str | Path) -> None:
    """Accuracy against the pruned ratio, one line per layer, the sensitive ones dashed and named."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    ratios = [float(r) for r in table["ratios"]]
    for name, accs in table["layers"].items():
        hot = name in sensitive
        ax.plot(ratios, [accs[str(r)] for r in ratios], marker="o", markersize=3, linestyle="--" if hot else "-",
                linewidth=2 if hot else 1, label=name + (" (sensitive)" if hot else ""))
    ax.axhline(table["baseline"], color="0.5", linestyle=":", label="unpruned")
    ax.set_xlabel("fraction of the layer's filters pruned (smallest L1 norm first)")
    ax.set_ylabel("accuracy without retraining (%)")
    ax.set_title(f"per-layer sensitivity ({table.get('source') or 'model'})", fontsize=10)
    ax.legend(fontsize=6, ncol=2 if len(table["layers"]) > 12 else 1, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any, max_batches: int | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader`` (its first ``max_batches`` batches); ``reduce`` sums the
    ``(correct, total)`` counts over DDP ranks that each read their own shard."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        counts += torch.tensor([float((model(x).argmax(1) == y).sum()), float(y.numel())], dtype=torch.float64)
    if reduce is not None:
        counts = reduce(counts)
    return 100.0 * float(counts[0]) / max(float(counts[1]), 1.0)
