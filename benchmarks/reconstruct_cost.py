"""Cost of the data-driven pruning methods (ThiNet, He et al.'s channel pruning) as the sample count grows.

Both methods keep only Gram statistics of their samples (C x C for ThiNet, (C k) x (C k) for channel
pruning), never the samples themselves, so their memory should stay flat in the number of images while
their time grows linearly (one partial forward pass per pruned layer and image, plus per-layer solves
whose cost does not depend on the samples).

Each (method, image count) runs in its own child process, so that its peak resident memory (``ru_maxrss``)
is its own; the parent prints one row per run and the growth from the smallest to the largest image count::

    python benchmarks/reconstruct_cost.py                                  # VGG-16, 112x112, 8/16/32 images
    python benchmarks/reconstruct_cost.py --size 224 --images 4 8 --methods thinet --threads 2 --json

What is measured: ``ThiNetPruning(target="thinet_conv")`` and ``ChannelPruning(target="5x")`` on a
randomly initialised full-width VGG-16 (no BN; the paper's targets prune conv1_1 ... conv4_3, conv5 and
the FC head stay whole), on N(0, 1) images held in memory, ``positions_per_image`` 10, batches of
``--batch-size`` images (fixed, so activation memory is the same for every image count). Time is the
wall time of ``prune()`` (sampling, selection, refit, surgery, export without writing a file) and the part
spent collecting statistics (forward passes and accumulation, the part that grows with the images); memory is
the child's peak RSS, and the largest statistics any one layer held (bytes of its accumulators).

On a CPU, 224x224 inputs make VGG-16's forward passes the whole cost; the default 112x112 keeps the run at a
few minutes and changes neither the statistics' sizes nor the per-layer solves.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = {"thinet": ("ThiNetPruning", "thinet_conv"), "cp": ("ChannelPruning", "5x")}


def _child(args: argparse.Namespace) -> dict:
    """One run in this process: prune VGG-16 with one method on ``args.images`` images; returns the figures."""
    from torch.utils.data import DataLoader, TensorDataset

    import callbacks
    import lit_prune.core.reconstruct as rc
    import lit_prune.core.reconstruct.driver as rc_driver
    from lit_prune.models import create_model

    torch.set_num_threads(args.threads)
    largest = {"bytes": 0}
    zeros = rc.GramStats.zeros.__func__

    def tracked(cls, dim, targets, device=None):  # record the accumulators' size, layer by layer
        stats = zeros(cls, dim, targets, device)
        size = sum(t.numel() * t.element_size() for t in (stats.gram, stats.cross, stats.sq, stats.count))
        largest["bytes"] = max(largest["bytes"], size)
        return stats

    rc.GramStats.zeros = classmethod(tracked)
    sampling = {"seconds": 0.0}

    def timed(fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sampling["seconds"] += time.perf_counter() - t

        return wrapper

    for name in ("collect_thinet_stats", "collect_regression_stats"):  # the driver looks them up at call time
        setattr(rc_driver, name, timed(getattr(rc_driver, name)))
    torch.manual_seed(0)
    model = create_model("vgg16").eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, args.size, args.size, generator=g)
    loader = DataLoader(TensorDataset(images, torch.zeros(args.images, dtype=torch.long)), batch_size=args.batch_size)
    cls_name, target = METHODS[args.method]
    method = getattr(callbacks, cls_name)(target=target, num_images=args.images, positions_per_image=10,
                                          batch_size=args.batch_size, artifact_path=None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    art = method.prune(model, dataloader=loader)
    seconds = time.perf_counter() - t0
    return {
        "method": args.method, "images": args.images, "size": args.size, "seconds": seconds,
        "sampling_seconds": sampling["seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024, "largest_stats_mb": largest["bytes"] / 2**20,
        "layers": len(method.results), "samples_first_layer": method.results[0]["samples"],
        "flops_ratio": art.flops.ratio,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["thinet", "cp"], choices=sorted(METHODS))
    parser.add_argument("--images", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--size", type=int, default=112, help="input side (224 is the paper's; heavy on a CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.method, args.images = args.child, args.images[0]
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for method in args.methods:
        for n in args.images:
            cmd = [sys.executable, __file__, "--child", method, "--images", str(n), "--size", str(args.size),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not args.json:
                r = rows[-1]
                print(f"{method:7s} {n:4d} images ({r['samples_first_layer']:5d} samples/layer): "
                      f"{r['seconds']:6.1f} s (sampling {r['sampling_seconds']:6.1f} s), "
                      f"peak RSS {r['peak_rss_mb']:7.0f} MB (model loaded: {r['rss_before_mb']:6.0f} MB), "
                      f"largest statistics {r['largest_stats_mb']:6.1f} MB, {r['layers']} layers, "
                      f"FLOPs ratio {r['flops_ratio']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows))
        return 0
    lo, hi = min(args.images), max(args.images)
    for method in args.methods:
        a = next(r for r in rows if r["method"] == method and r["images"] == lo)
        b = next(r for r in rows if r["method"] == method and r["images"] == hi)
        print(f"{method}: {hi / lo:.0f}x the images -> time x{b['seconds'] / a['seconds']:.2f} "
              f"(sampling x{b['sampling_seconds'] / a['sampling_seconds']:.2f}), "
              f"peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.3f}, "
              f"statistics x{b['largest_stats_mb'] / a['largest_stats_mb']:.2f} "
              f"(input {args.size}x{args.size}, batch {args.batch_size}, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
