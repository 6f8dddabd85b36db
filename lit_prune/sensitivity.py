"""``python -m lit_prune.sensitivity``: Li et al.'s per-layer sensitivity scan of a trained model.

    python -m lit_prune.sensitivity --checkpoint runs/vgg16/checkpoints/last.ckpt \\
        --data-config configs/cifar/l1_vgg16.yaml --ratios 0.1,0.2,...,0.9 --out runs/sensitivity/vgg16

Each conv layer (channel group) is pruned alone by filter L1 norm at each ratio and tested without retraining on
the data config's validation data. Writes ``sensitivity.json`` (resumable: a stopped scan continues with the next
layer), ``sensitivity.png`` (accuracy vs ratio, one line per layer, sensitive layers dashed) and
``method.yaml``, the L1FilterPruning config that skips the sensitive layers and prunes each other layer by the
largest ratio it tolerates. Under ``torchrun --nproc_per_node N -m lit_prune.sensitivity ...`` each rank
evaluates its own share of the validation images (every N-th), the counts are summed over the ranks, and rank 0
alone writes the files: the table equals a one-process scan's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# torch is imported once the arguments parse


def _ratios(text: str) -> list[float]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 3 and parts[1] == "...":  # 0.1,...,0.9
        lo, hi = float(parts[0]), float(parts[2])
        return [round(lo + i * 0.1, 6) for i in range(round((hi - lo) / 0.1) + 1)]
    if len(parts) >= 3 and parts[-2] == "...":  # 0.1,0.2,...,0.9
        lo, step, hi = float(parts[0]), float(parts[1]) - float(parts[0]), float(parts[-1])
        return [round(lo + i * step, 6) for i in range(round((hi - lo) / step) + 1)]
    values = [float(p) for p in parts]
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must be fractions in (0, 1), got {text}")
    return values


def _distributed():
    """``(rank, reduce)``: under torchrun (``WORLD_SIZE`` > 1) the process group is started and ``reduce`` sums a
    tensor over the ranks; otherwise ``(0, None)``."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def reduce(t):
        dist.all_reduce(t)
        return t

    return dist.get_rank(), reduce


def _shard(loader, max_batches: int | None):
    """The validation images this rank evaluates: the first ``max_batches`` batches' worth, every world-size-th."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    dataset = loader.dataset
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * loader.batch_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return DataLoader(Subset(dataset, range(rank, n, world)), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.sensitivity", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="Lightning checkpoint (or artifact) of the model")
    parser.add_argument("--arch", help="zoo model name, with --weights")
    parser.add_argument("--weights", help="plain state dict for --arch")
    parser.add_argument("--data-config", required=True, help="training config (or data: entry) naming the data")
    parser.add_argument("--ratios", type=_ratios, default=_ratios("0.1,...,0.9"), help="default 0.1,...,0.9")
    parser.add_argument("--probe", type=float, default=0.5, help="the ratio a sensitive layer is judged at")
    parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy points a layer may cost")
    parser.add_argument("--max-batches", type=int, help="evaluate on the first N validation batches only")
    parser.add_argument("--out", required=True, help="directory of sensitivity.json/.png and method.yaml")
    args = parser.parse_args(argv)
    import yaml

    from lit_prune.search.sensitivity import accuracy, plot, proposal, scan
    from lit_prune.sources import load_datamodule, load_source

    rank, reduce = _distributed()
    try:
        model, _ = load_source(args.checkpoint, args.arch, args.weights, None)
        loader = _shard(load_datamodule(args.data_config).val_dataloader(), args.max_batches)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = scan(model.eval(), lambda m: accuracy(m, loader, reduce=reduce), args.ratios,
                     out / "sensitivity.json", source=args.checkpoint or args.weights or "", progress=rank == 0,
                     write=rank == 0)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if err.args and not isinstance(err, OSError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    found = proposal(table, args.probe, args.tolerance)
    plot(table, found["sensitive"], out / "sensitivity.png")
    method = {"trainer": {"callbacks": [{"class_path": "callbacks.L1FilterPruning", "init_args": found["init_args"]}]}}
    (out / "method.yaml").write_text(f"# from python -m lit_prune.sensitivity (probe {found['probe']}, tolerance "
                                     f"{found['tolerance']} points)\n" + yaml.safe_dump(method, sort_keys=False))
    print(f"baseline {table['baseline']:.2f}%; sensitive at {found['probe']:.0%}: {found['sensitive'] or 'none'}")
    print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.png'}, {out / 'method.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
