"""Images/s of the device-resident data path (``device: true``) against the classic DataLoader path.

    python benchmarks/data_path.py                                # CIFAR-10-shaped, batch 128, 7 rounds
    python benchmarks/data_path.py --images 10000 --batch-size 64 --threads 1 --json

Both sides are ``CIFARDataModule`` on the same generated CIFAR-10 written in the real on-disk format
(``cifar-10-batches-py`` pickles, random pixels) to a temporary folder, with the paper's training
augmentation (zero-pad 4, random 32x32 crop, horizontal flip) and normalisation:

- classic: ``device: false`` (the default): a PIL image at a time through torchvision's transforms,
  collated by the DataLoader (``--workers``, default 0: a worker process would keep decoding while the
  other side is timed, and this machine has two cores);
- device: ``device: true``: the split held once as uint8 on the device (here the CPU), each batch indexed,
  cropped, flipped and normalised with batched tensor ops.

Two measurements, each interleaved call by call (classic, device, device, classic, ...; ``_common.alternate``),
grouped into ``--rounds`` rounds after a discarded warm-up round:

- loader alone: one call fetches the next batch (a new epoch, ``set_epoch``, when one ends); a round is
  ``--batches`` batches of each side;
- training step: one call is one plain SGD step of ResNet-20 (``cifar_resnet20``: zero_grad, forward,
  cross-entropy, backward, step) on the next batch of that side's loader, one model per side (same initial
  weights); a round is ``--steps`` steps of each side.

Alternating call by call matters here: a device batch takes about a millisecond, a classic one tens, so
whole-round blocks would let a contention burst of a second fall on a short device block alone.

Per round the ratio is images/s of the device path over the classic one; printed: its median, min, max and
IQR over the rounds, and the median images/s of each side. The goal (issue 12) is >= 10x for the loader
alone on this CPU; on a CPU the training step is dominated by the model, so its ratio is close to 1 + the
classic loader's share of a step. Goals, not gates: never assert timings in tests.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import add_runtime_args, alternate, load_average, setup_runtime, spread, summarize  # repo on sys.path

from lit_prune.datamodules import CIFARDataModule
from lit_prune.models import create_model


def write_cifar10(root: Path, num_train: int, num_test: int = 100, seed: int = 0) -> None:
    """Random CIFAR-10 in torchvision's layout: five training batches, a test batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [len(part) for part in np.array_split(np.arange(num_train), 5)] + [num_test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, sizes, strict=True):
        entry = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"img{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f)


class Batches:
    """Endless batches of a training loader, a new epoch (``set_epoch``) each time one ends."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.epoch, self.it = loader, 0, None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self.it is None:
                self.loader.sampler.set_epoch(self.epoch)
                self.epoch += 1
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None


def fetch(batches: Batches) -> Callable[[], int]:
    """One call: the next batch; returns its images."""
    return lambda: batches()[0].shape[0]


def train_step(batches: Batches, model: torch.nn.Module) -> Callable[[], int]:
    """One call: one SGD step of ``model`` on the next batch; returns its images."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def run() -> int:
        x, y = batches()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return x.shape[0]

    return run


def measure(sides: dict[str, Callable[[], int]], per_round: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Images/s per side and per round, and the per-round ratio device / classic.

    The sides alternate call by call (classic, device, device, classic, ...: ``_common.alternate`` with one
    call per side per "round" of its own), so a contention burst of a few seconds slows both sides of the
    round it falls in by the same factor: the device side's calls are short, but they are spread over the
    whole round. A round of the report is ``per_round`` consecutive calls of each side.
    """
    counts: dict[str, list[int]] = {name: [] for name in sides}

    def counted(name: str) -> Callable[[], None]:
        return lambda: counts[name].append(sides[name]())

    times = alternate({name: counted(name) for name in sides}, rounds=rounds * per_round,
                      warmup=warmup * per_round)
    ips: dict[str, list[float]] = {}
    for name in sides:
        images = counts[name][warmup * per_round:]
        spans = [slice(r * per_round, (r + 1) * per_round) for r in range(rounds)]
        ips[name] = [sum(images[span]) / sum(times[name][span]) for span in spans]
    ratios = [d / c for d, c in zip(ips["device"], ips["classic"], strict=True)]
    return {"ratio": summarize(ratios), "ratios": ratios,
            "images_per_s": {name: statistics.median(v) for name, v in ips.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000, help="training images written (CIFAR-10: 50000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="batches per loader round")
    parser.add_argument("--steps", type=int, default=5, help="ResNet-20 training steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="discarded leading rounds")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the classic side")
    parser.add_argument("--skip-step", action="store_true", help="measure the loader alone")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    malloc = setup_runtime(args)
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="data_path_") as tmp:
        write_cifar10(Path(tmp), args.images, seed=args.seed)
        torch.manual_seed(args.seed)
        modules = {
            "classic": CIFARDataModule(tmp, batch_size=args.batch_size, num_workers=args.workers, verify=False),
            "device": CIFARDataModule(tmp, batch_size=args.batch_size, verify=False, device=True),
        }
        loaders = {}
        for name, dm in modules.items():
            dm.setup("fit")
            loaders[name] = dm.train_dataloader()
        result: dict[str, Any] = {
            "images": args.images, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "workers": args.workers, "malloc": malloc, "load_before": load_before,
        }
        batches = {name: Batches(loader) for name, loader in loaders.items()}
        result["loader"] = measure({n: fetch(b) for n, b in batches.items()}, args.batches, args.rounds, args.warmup)
        if not args.skip_step:
            torch.manual_seed(args.seed)
            models = {"classic": create_model("cifar_resnet20", num_classes=10),
                      "device": create_model("cifar_resnet20", num_classes=10)}
            models["device"].load_state_dict(models["classic"].state_dict())
            for m in models.values():
                m.train()
            result["step"] = measure({n: train_step(b, models[n]) for n, b in batches.items()}, args.steps,
                                     args.rounds, args.warmup)
        result["load_after"] = load_average()

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"CIFAR-10-shaped, {args.images} training images, batch {args.batch_size}, {args.rounds} rounds "
          f"(+{args.warmup} warm-up), threads {result['threads']}, classic workers {args.workers}, malloc {malloc}")
    for key, what in (("loader", f"loader alone ({args.batches} batches/round)"),
                      ("step", f"ResNet-20 training step ({args.steps} steps/round)")):
        if key not in result:
            continue
        r = result[key]
        print(f"{what}: classic {r['images_per_s']['classic']:,.0f} img/s, device "
              f"{r['images_per_s']['device']:,.0f} img/s; ratio device/classic {spread(r['ratio'], 2)}")
    print(f"load average before {load_before}, after {result['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
