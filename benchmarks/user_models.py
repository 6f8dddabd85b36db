"""Models outside the zoo: coverage, MACs cut and prune time, ours (Torch-Pruning's groups, our surgery) vs
Torch-Pruning's own pruner, on the nine models of issue 11 and torchvision's ViT-B/16 (random weights,
nothing downloaded).

    python benchmarks/user_models.py [--models resnet18 mobilenet_v2] [--latency] [--rounds 7]

Coverage: the share of conv output channels in some prunable group. MACs: dense / pruned at 30% of every
group (L1, per group; Torch-Pruning: MagnitudeImportance, pruning_ratio 0.3, heads for the ViT). Prune time:
the surgery alone, graph built beforehand on both sides, ours / Torch-Pruning's. ``--latency``: CPU forward
speed-up / MACs ratio with and without round_to 8 (Torch-Pruning's ratio then chosen to match our MACs: its
rounding goes down, ours up), interleaved, median of pairwise ratios, and ours / Torch-Pruning's of that ratio
(the same pairs).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import _common
import torch
from torch import nn

MODELS = ["tv:resnet18", "tv:resnet50", "tv:vgg16_bn", "tv:mobilenet_v2", "tv:densenet121", "timm:efficientnet_b0",
          "timm:convnext_tiny", "timm:regnety_016", "timm:vit_tiny_patch16_224", "tv:vit_b_16"]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    src, arch = name.split(":")
    if src == "tv":
        import torchvision
        return torchvision.models.get_model(arch, weights=None).eval()
    import timm
    return timm.create_model(arch, pretrained=False).eval()


def ours(model: nn.Module, ratio: float, round_to: int = 1) -> tuple[nn.Module, float]:
    from lit_prune.core.groups import channel_groups
    from lit_prune.core.surgery import prune_groups
    from lit_prune.methods.filter_norm import FilterNormPruning
    from lit_prune.methods.plan import WidthPlan
    groups = channel_groups(model, (3, 224, 224))
    keeps = FilterNormPruning(WidthPlan(prune_ratio=ratio, round_to=round_to)).keeps(model)
    start = time.perf_counter()
    prune_groups(model, keeps, groups)
    return model, time.perf_counter() - start


def theirs(model: nn.Module, ratio: float, round_to: int = 1) -> tuple[nn.Module, float]:
    import torch_pruning as tp
    x = torch.zeros(1, 3, 224, 224)
    heads = {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    # torchvision's nn.MultiheadAttention keeps its heads and loses head dims with the stream (as ours)
    mha = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[out], num_heads={**heads, **mha},
                                      prune_num_heads=bool(heads), prune_head_dims=bool(mha),
                                      head_pruning_ratio=ratio, round_to=round_to if round_to > 1 else None)
        start = time.perf_counter()
        pruner.step()
    for m in model.modules():
        if hasattr(m, "qkv") and m.qkv in pruner.num_heads:
            m.num_heads = pruner.num_heads[m.qkv]
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
    if hasattr(model, "hidden_dim"):  # torchvision's ViT; Torch-Pruning leaves it to its user
        model.hidden_dim = model.conv_proj.out_channels
    return model, time.perf_counter() - start


def theirs_at(dense: nn.Module, target: int, round_to: int) -> nn.Module:
    """Torch-Pruning's model whose MACs are closest to ``target``: its ratio bisected (its round_to rounds the
    kept widths down, ours up, so the same ratio gives other MACs)."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(10):
        mid = (lo + hi) / 2
        model = theirs(copy.deepcopy(dense), mid, round_to)[0]
        m = macs(model)
        if best is None or abs(m - target) < abs(best[0] - target):
            best = (m, model)
        lo, hi = (mid, hi) if m > target else (lo, mid)
    return best[1]


def coverage(model: nn.Module) -> tuple[float, float]:
    import torch_pruning as tp

    from lit_prune.core.groups import channel_groups
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    total = sum(m.out_channels for m in convs.values())
    mine = {m.path for g in channel_groups(model, (3, 224, 224)) for m in g.members if m.kind == "out"}
    dg = tp.DependencyGraph().build_dependency(model, torch.zeros(1, 3, 224, 224), verbose=False)
    names = {m: n for n, m in model.named_modules()}
    tps = {names.get(it.dep.target.module) for g in dg.get_all_groups() for it in g.items
           if dg.is_out_channel_pruning_fn(it.dep.handler) and isinstance(it.dep.target.module, nn.Module)}
    share = lambda s: sum(convs[n].out_channels for n in convs if n in s) / total  # noqa: E731
    return share(mine), share(tps)


def macs(model: nn.Module) -> int:
    from lit_prune.core.flops import count_flops
    return count_flops(model, (3, 224, 224)).macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    _common.add_runtime_args(parser)
    args = parser.parse_args()
    _common.setup_runtime(args)
    names = [n for n in MODELS if args.models is None or n.split(":")[1] in args.models]
    print(f"load {_common.load_average()}")
    print("| model | ours: prunable | Torch-Pruning | MACs cut at 30%, ours / TP | prune time ours / TP |")
    print("|---|---|---|---|---|")
    for name in names:
        dense = build(name)
        cov = coverage(dense)
        a, ta = ours(copy.deepcopy(dense), 0.3)
        b, tb = theirs(copy.deepcopy(dense), 0.3)
        d = macs(dense)
        print(f"| {name} | {cov[0]:.1%} | {cov[1]:.1%} | {d / macs(a):.2f}x / {d / macs(b):.2f}x | "
              f"{ta:.3f} s / {tb:.3f} s = {ta / tb:.2f} |", flush=True)
        if args.latency:
            a8 = ours(copy.deepcopy(dense), 0.3, 8)[0]
            sides = {"dense": dense, "ours": a, "ours_r8": a8, "tp": b, "tp_r8": theirs_at(dense, macs(a8), 8)}
            x = torch.randn(8, 3, 224, 224)
            with torch.no_grad():
                times = _common.alternate({k: (lambda m=m, x=x: m(x)) for k, m in sides.items()}, args.rounds)
            ratio = {k: [dt / pt / (d / macs(sides[k])) for dt, pt in zip(times["dense"], times[k], strict=True)]
                     for k in ("ours", "ours_r8", "tp", "tp_r8")}
            for k, per in ratio.items():
                print(f"   {k} ({d / macs(sides[k]):.2f}x fewer MACs): speed-up / MACs ratio "
                      f"{_common.spread(_common.summarize(per))}", flush=True)
            for a_, b_ in (("ours", "tp"), ("ours_r8", "tp_r8")):  # the goal: >= 0.95
                per = [x / y for x, y in zip(ratio[a_], ratio[b_], strict=True)]
                print(f"   {a_} / {b_}: {_common.spread(_common.summarize(per))}", flush=True)


if __name__ == "__main__":
    main()
