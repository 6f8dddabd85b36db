"""CPU inference speed-up of physically pruned models against their FLOPs ratio, and their export time.

    python benchmarks/inference_speedup.py --threads 1                # 3 models x batch 64, 128; ~3 min
    python benchmarks/inference_speedup.py --models resnet56-B --batch-sizes 128 --rounds 11 --json

Models (``--models``), each pruned by its library callback from a freshly initialised dense model:

- ``vgg16-A``: ``create_model("cifar_vgg16")`` pruned by ``callbacks.L1FilterPruning(target="A")``.
- ``resnet56-B``: ``create_model("cifar_resnet56")`` pruned by ``L1FilterPruning(target="B")``.
- ``vgg19-slim70``: ``create_model("slim_vgg19")`` pruned by ``callbacks.NetworkSlimming(prune_ratio=0.7)``
  after its BN gammas are randomised (:func:`sparse_gammas`), so that the global threshold leaves an
  uneven width pattern like a sparsity-trained network's: wide early layers, thin late ones, odd counts.

Export (select + surgery on a copy + artifact dict with FLOPs counts + atomic write of the file) is timed
``--export-repeats`` times with a fresh callback each time (so the dense FLOPs are counted too, as
``python -m lit_prune.prune`` does); the model timed is the one loaded back from the written file.

Speed: the dense, the pruned and (``--round-to 8``) a *hypothetical* pruned model whose widths are
rounded up to multiples of 8 (capped at the dense width; random weights, for timing only) run one
forward pass each per round, in eval mode under ``torch.inference_mode`` on fixed 32x32 N(0, 1) inputs,
interleaved with the order rotated every round; the first round is discarded. Per round the speed-up
is ``t(dense) / t(pruned)``; the figure is the median over rounds with its spread. The FLOPs ratio is
the artifact's (dense MACs / pruned MACs, conv and linear only), and ``speed-up / FLOPs ratio`` is the
efficiency (target >= 0.9). The rounded column shows how much of a shortfall odd widths cause. No
library code is changed. The figures are goals, not gates: never assert them in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (  # also makes the repository importable
    add_runtime_args,
    alternate,
    load_average,
    setup_runtime,
    spread,
    summarize,
)
from torch import nn

from callbacks import L1FilterPruning, NetworkSlimming, PruningCallback
from lit_prune.artifact import Artifact, load_model, save_artifact
from lit_prune.core.flops import count_flops
from lit_prune.methods.base import Decision
from lit_prune.models import architecture, create_model

GAMMA_RECIPE = (
    "BN gammas of slim_vgg19, conv layer l = 0..15 (t = l/15): each channel is 'alive' with probability "
    "min(1, (1-t)^1.5 + 0.05), alive gamma = 0.1 + |N(0,1)|, dead gamma = 0.01 |N(0,1)| (torch generator seed {seed})"
)


def sparse_gammas(model: nn.Module, seed: int = 0) -> None:
    """Give ``model``'s BatchNorm2d gammas the look of a sparsity-trained network (see ``GAMMA_RECIPE``).

    After L1 sparsity training most gammas of the late, wide layers sit near zero and a few stay large,
    while the early layers keep most channels. Here the share of "alive" channels falls from 100% in the
    first conv to 5% in the last; about 1,650 of VGG-19's 5,504 channels are alive, so a 70% global
    threshold falls between the alive and the dead ones and the kept widths are uneven and odd.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for layer, bn in enumerate(bns):
            t = layer / max(len(bns) - 1, 1)
            alive = torch.rand(bn.num_features, generator=gen) < min(1.0, (1 - t) ** 1.5 + 0.05)
            g = torch.randn(bn.num_features, generator=gen).abs()
            bn.weight.copy_(torch.where(alive, 0.1 + g, 0.01 * g))


def _vgg16_a(seed: int) -> tuple[nn.Module, Callable[[], PruningCallback], str]:
    return (create_model("cifar_vgg16"), lambda: L1FilterPruning(target="A", artifact_path=None),
            "cifar_vgg16, L1FilterPruning(target='A')")


def _resnet56_b(seed: int) -> tuple[nn.Module, Callable[[], PruningCallback], str]:
    return (create_model("cifar_resnet56"), lambda: L1FilterPruning(target="B", artifact_path=None),
            "cifar_resnet56, L1FilterPruning(target='B')")


def _vgg19_slim70(seed: int) -> tuple[nn.Module, Callable[[], PruningCallback], str]:
    model = create_model("slim_vgg19")
    sparse_gammas(model, seed)
    return (model, lambda: NetworkSlimming(prune_ratio=0.7, artifact_path=None),
            "slim_vgg19, NetworkSlimming(prune_ratio=0.7); " + GAMMA_RECIPE.format(seed=seed))


MODELS: dict[str, Callable[[int], tuple[nn.Module, Callable[[], PruningCallback], str]]] = {
    "vgg16-A": _vgg16_a,
    "resnet56-B": _resnet56_b,
    "vgg19-slim70": _vgg19_slim70,
}


def round_cfg(cfg: list[Any], dense_cfg: list[Any], multiple: int) -> list[Any]:
    """``cfg`` with every non-zero width rounded up to a multiple of ``multiple``, capped at the dense width.

    Pools (``"M"``) and zero widths (a removed residual branch) are kept as they are.
    """
    if len(cfg) != len(dense_cfg):
        raise ValueError(f"cfg {cfg} and the dense cfg {dense_cfg} differ in length")
    return [w if isinstance(w, str) or w == 0 else min(-(-w // multiple) * multiple, d)
            for w, d in zip(cfg, dense_cfg, strict=True)]


def layer_times(
    nets: dict[str, nn.Module], x: torch.Tensor, repeats: int
) -> dict[str, dict[str, Any]]:
    """Where the forward time goes: per-conv/linear wall time, against the layer's MACs.

    Each net runs ``repeats`` forward passes, interleaved, with a pre/post forward hook on every Conv2d
    and Linear (a few microseconds per layer). Per net: the median total ms, the median ms spent in the
    counted layers ("layers") and elsewhere ("rest": BatchNorm, ReLU, pooling, residual adds, Python), and
    per layer shape ``"C_in->C_out@HxW"`` the summed ms, MACs (of the batch) and the throughput in GMAC/s.
    """
    counted = {key: [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
               for key, net in nets.items()}
    # per net and layer: seconds in each pass, filled by the hooks (pass r adds at index r)
    seconds: dict[str, dict[str, list[float]]] = {key: {n: [] for n, _ in layers} for key, layers in counted.items()}
    totals: dict[str, list[float]] = {key: [] for key in nets}
    starts: dict[nn.Module, float] = {}

    def pre(module: nn.Module, inputs: Any) -> None:
        starts[module] = time.perf_counter()

    def post_for(per_layer: list[float]) -> Callable[..., None]:
        def post(module: nn.Module, inputs: Any, output: Any) -> None:
            per_layer[-1] += time.perf_counter() - starts[module]

        return post

    hooks = []
    for key, layers in counted.items():
        for name, m in layers:
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post_for(seconds[key][name]))]
    try:
        with torch.inference_mode():
            keys = list(nets)
            for r in range(repeats + 1):  # pass 0 warms up and is dropped; the order rotates every pass
                for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                    for per_layer in seconds[key].values():
                        per_layer.append(0.0)
                    start = time.perf_counter()
                    nets[key](x)
                    totals[key].append(time.perf_counter() - start)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for key, net in nets.items():
        counts = {layer.name: layer for layer in count_flops(net).layers}
        shapes: dict[str, dict[str, float]] = {}
        layers_ms = 0.0
        for name, per_pass in seconds[key].items():
            ms = 1000 * statistics.median(per_pass[1:])
            layers_ms += ms
            module, layer = net.get_submodule(name), counts[name]
            if isinstance(module, nn.Conv2d):
                shape = f"{module.in_channels}->{module.out_channels}@{layer.output_shape[-2]}x{layer.output_shape[-1]}"
            else:
                shape = f"fc {module.in_features}->{module.out_features}"
            entry = shapes.setdefault(shape, {"ms": 0.0, "macs": 0.0, "layers": 0})
            entry["ms"] += ms
            entry["macs"] += layer.macs * x.shape[0]
            entry["layers"] += 1
        for entry in shapes.values():
            entry["gmac_per_s"] = entry["macs"] / entry["ms"] / 1e6 if entry["ms"] > 0 else float("nan")
        total = 1000 * statistics.median(totals[key][1:])
        out[key] = {"total_ms": total, "layers_ms": layers_ms, "rest_ms": total - layers_ms, "shapes": shapes}
    return out


def export_times(
    dense: nn.Module, make: Callable[[], PruningCallback], path: Path, repeats: int
) -> tuple[Artifact, dict[str, list[float]]]:
    """Export ``dense`` ``repeats`` times (fresh callback each); return the last artifact and ms per part.

    Parts: ``select`` (the callback's selection), ``export`` (copy, surgery, FLOPs counts, the Artifact),
    ``write`` (atomic ``torch.save`` with fsync).
    """
    times: dict[str, list[float]] = {"select": [], "export": [], "write": [], "total": []}
    art: Artifact | None = None
    for _ in range(repeats):
        cb = make()
        t0 = time.perf_counter()
        keeps = cb.select(dense)
        t1 = time.perf_counter()
        art = cb.export(dense, Decision(keeps=keeps), path=None)
        t2 = time.perf_counter()
        save_artifact(art, path)
        t3 = time.perf_counter()
        for key, seconds in (("select", t1 - t0), ("export", t2 - t1), ("write", t3 - t2), ("total", t3 - t0)):
            times[key].append(1000 * seconds)
    assert art is not None, "the zoo models of this benchmark always export an artifact"
    return art, times


def measure_model(
    key: str,
    batch_sizes: list[int],
    rounds: int = 7,
    warmup: int = 1,
    round_to: int = 8,
    export_repeats: int = 3,
    breakdown_repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Prune model ``key`` (timing the export), then time dense / pruned / rounded forwards per batch size.

    With ``breakdown_repeats`` > 0, :func:`layer_times` of the dense and pruned models at the first
    batch size is added (``"breakdown"``): conv/linear time against the rest, and GMAC/s per layer shape.
    """
    if key not in MODELS:
        raise ValueError(f"unknown model {key!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    dense, make, how = MODELS[key](seed)
    dense.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{key}.pt"
        art, export_ms = export_times(dense, make, path, export_repeats)
        pruned = load_model(path)  # the exported model as a user gets it, in eval mode
    name, kwargs = art.architecture.name, dict(art.architecture.kwargs)
    dense_macs = art.flops.dense.macs
    cfg, dense_cfg = kwargs["cfg"], architecture(dense)["kwargs"]["cfg"]
    rounded_cfg = round_cfg(cfg, dense_cfg, round_to) if round_to > 1 else cfg
    rounded = None
    if rounded_cfg != cfg:
        rounded = create_model(name, **{**kwargs, "cfg": rounded_cfg}).eval()
    result: dict[str, Any] = {
        "model": key,
        "how": how,
        "cfg": cfg,
        "dense_cfg": dense_cfg,
        "flops_ratio": art.flops.ratio,
        "params_dense": art.flops.dense.params,
        "params_pruned": art.flops.pruned.params,
        "export_ms": export_ms,
        "export_ms_median": {k: statistics.median(v) for k, v in export_ms.items()},
        "round_to": round_to,
        "rounded_cfg": rounded_cfg if rounded is not None else None,
        "rounded_flops_ratio": dense_macs / count_flops(rounded).macs if rounded is not None else None,
        "batches": [],
    }
    for bs in batch_sizes:
        x = torch.randn(bs, *getattr(dense, "input_size", (3, 32, 32)), generator=torch.Generator().manual_seed(seed))
        nets = {"dense": dense, "pruned": pruned, **({"rounded": rounded} if rounded is not None else {})}
        sides = {k: (lambda net=net, x=x: net(x)) for k, net in nets.items()}
        with torch.inference_mode():
            times = alternate(sides, rounds, warmup)
        row: dict[str, Any] = {"batch_size": bs, **{f"{k}_ms": [1000 * s for s in v] for k, v in times.items()}}
        speedups = [d / p for d, p in zip(times["dense"], times["pruned"], strict=True)]
        row.update(speedups=speedups, speedup=summarize(speedups))
        row["efficiency"] = row["speedup"]["median"] / result["flops_ratio"]
        if rounded is not None:
            r_speedups = [d / r for d, r in zip(times["dense"], times["rounded"], strict=True)]
            row.update(rounded_speedups=r_speedups, rounded_speedup=summarize(r_speedups))
            row["rounded_efficiency"] = row["rounded_speedup"]["median"] / result["rounded_flops_ratio"]
        result["batches"].append(row)
    if breakdown_repeats > 0:
        x = torch.randn(batch_sizes[0], *getattr(dense, "input_size", (3, 32, 32)),
                        generator=torch.Generator().manual_seed(seed))
        result["breakdown_batch_size"] = batch_sizes[0]
        result["breakdown"] = layer_times({"dense": dense, "pruned": pruned}, x, breakdown_repeats)
    return result


def measure(
    models: list[str] | None = None, batch_sizes: list[int] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`measure_model` for each model (default: all) and the run's settings."""
    keys = list(models or MODELS)
    batch_sizes = list(batch_sizes or [64, 128])
    return {
        "batch_sizes": batch_sizes,
        "threads": torch.get_num_threads(),
        **{k: v for k, v in kwargs.items()},
        "results": [measure_model(k, batch_sizes, **kwargs) for k in keys],
    }


def _table(res: dict[str, Any]) -> str:
    med = statistics.median
    head = ("model", "batch", "dense ms", "pruned ms", "speed-up", "IQR", "FLOPs x", "eff",
            f"round{res['round_to']} ms", "speed-up", "FLOPs x", "eff")
    rows = ["{:<13} {:>5} {:>9} {:>9} {:>8} {:>11} {:>7} {:>5} {:>9} {:>8} {:>7} {:>5}".format(*head)]
    for r in res["results"]:
        for b in r["batches"]:
            s = b["speedup"]
            line = (f"{r['model']:<13} {b['batch_size']:>5} {med(b['dense_ms']):>9.1f} {med(b['pruned_ms']):>9.1f} "
                    f"{s['median']:>8.2f} {s['q1']:>5.2f}-{s['q3']:<5.2f} {r['flops_ratio']:>7.2f} "
                    f"{b['efficiency']:>5.2f}")
            if "rounded_ms" in b:
                line += (f" {med(b['rounded_ms']):>9.1f} {b['rounded_speedup']['median']:>8.2f} "
                         f"{r['rounded_flops_ratio']:>7.2f} {b['rounded_efficiency']:>5.2f}")
            else:
                line += f" {'(widths already multiples of ' + str(res['round_to']) + ')':>33}"
            rows.append(line)
    rows.append("")
    rows.append("{:<13} {:>10} {:>10} {:>10} {:>10}   (export ms, median of {})".format(
        "model", "select", "export", "write", "total", res["export_repeats"]))
    for r in res["results"]:
        e = r["export_ms_median"]
        rows.append(f"{r['model']:<13} {e['select']:>10.1f} {e['export']:>10.1f} {e['write']:>10.1f} "
                    f"{e['total']:>10.1f}")
    rows.append("")
    for r in res["results"]:
        rows.append(f"{r['model']}: {r['how']}")
        rows.append(f"  widths {r['cfg']}; params {r['params_pruned']:,} / {r['params_dense']:,}")
        if r["rounded_cfg"] is not None:
            rows.append(f"  rounded (hypothetical) {r['rounded_cfg']}")
        for b in r["batches"]:
            rows.append(f"  batch {b['batch_size']}: speed-up {spread(b['speedup'], 2)} over {res['rounds']} rounds")
        if "breakdown" in r:
            d, p = r["breakdown"]["dense"], r["breakdown"]["pruned"]
            rows.append(
                f"  where the time goes (batch {r['breakdown_batch_size']}, hooked run): conv+linear "
                f"{d['layers_ms']:.0f} -> {p['layers_ms']:.0f} ms (x{d['layers_ms'] / p['layers_ms']:.2f} for "
                f"x{r['flops_ratio']:.2f} fewer MACs), rest (BN, ReLU, pool, add) {d['rest_ms']:.0f} -> "
                f"{p['rest_ms']:.0f} ms (x{d['rest_ms'] / p['rest_ms']:.2f}); rest = "
                f"{100 * d['rest_ms'] / d['total_ms']:.0f}% -> {100 * p['rest_ms'] / p['total_ms']:.0f}% of the time"
            )
            rate = lambda b: sum(e["macs"] for e in b["shapes"].values()) / b["layers_ms"] / 1e6
            # the slowest shapes that matter (>= 2% of the pruned model's layer time)
            big = [kv for kv in p["shapes"].items() if kv[1]["ms"] >= 0.02 * p["layers_ms"]]
            slow = sorted(big, key=lambda kv: kv[1]["gmac_per_s"])[:4]
            rows.append(
                f"  conv throughput dense {rate(d):.0f} -> pruned {rate(p):.0f} GMAC/s; slowest pruned shapes: "
                + ", ".join(f"{k} {v['gmac_per_s']:.0f} GMAC/s ({v['ms']:.1f} ms)" for k, v in slow)
            )
    parts = "; ".join(
        f"{r['model']} " + ", ".join(f"b{b['batch_size']} {b['speedup']['median']:.2f}x/{r['flops_ratio']:.2f}="
                                      f"{b['efficiency']:.2f}" for b in r["batches"])
        for r in res["results"]
    )
    rows.append(
        f"speed-up / FLOPs ratio (target >= 0.9): {parts}; eval, inference_mode, 32x32, threads {res['threads']}, "
        f"malloc {res['malloc']}, load {res['load_before']} -> {res['load_after']}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (one forward per side each)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded leading rounds")
    parser.add_argument("--round-to", type=int, default=8,
                        help="also time the pruned widths rounded up to this multiple (hypothetical); 0 = off")
    parser.add_argument("--export-repeats", type=int, default=3, help="exports timed per model")
    parser.add_argument("--breakdown-repeats", type=int, default=3,
                        help="hooked forward passes per side for the per-layer time breakdown; 0 = off")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.export_repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("rounds, export-repeats and batch sizes must be >= 1 and warmup >= 0")

    malloc = setup_runtime(args)
    load_before = load_average()
    result = measure(models=args.models, batch_sizes=args.batch_sizes, rounds=args.rounds, warmup=args.warmup,
                     round_to=args.round_to, export_repeats=args.export_repeats,
                     breakdown_repeats=args.breakdown_repeats, seed=args.seed)
    result.update(malloc=malloc, load_before=load_before, load_after=load_average())
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
