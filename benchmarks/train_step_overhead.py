"""Training-step time of a zoo model through ``ImageClassifier`` + ``pl.Trainer`` against a plain loop.

    python benchmarks/train_step_overhead.py --model cifar_resnet20 --batch-size 64 --steps 20 --rounds 7
    python benchmarks/train_step_overhead.py --model cifar_vgg16 --cfg A --json

Both sides train the same model (the plain side on a deep copy made before training), on the same
in-memory batches, with the same SGD (momentum, weight decay), in one process with the same thread count.
The Trainer runs ``warmup + rounds`` epochs of ``steps`` batches; a callback runs the plain steps in
between, so that both sides see the same machine state. Round ``i`` pairs Lightning epoch ``i`` with its
``steps`` plain steps; the warm-up rounds are discarded. The figure is the median of the per-round ratios
(Lightning / plain), with their min, max and interquartile range.

``--interleave step`` (default) runs one plain step after every Lightning step (L P L P ...);
``--interleave epoch`` runs the ``steps`` plain steps after each Lightning epoch. On a shared machine
the step level is the one to trust: contention comes in bursts of a few seconds that can slow a
two-thread step tenfold, long enough to hit one side of an epoch-level pair and not the other.

What is timed, per side and round (wall clock, ``time.perf_counter``):

- Lightning: from ``on_train_batch_start`` of the first batch to ``on_train_batch_end`` of the last one,
  less the time spent in the plain steps, divided by ``steps``. This is the steady state a user pays per
  step: batch fetch and device transfer, the hooks, ``training_step`` (forward, cross-entropy,
  ``self.log`` of the loss, the torchmetrics accuracy update and its ``self.log``), backward,
  ``optimizer.step`` and ``zero_grad`` through Lightning's closure, and the per-step logging bookkeeping.
  Trainer start-up and the once-per-epoch work (metric compute and reset, LR scheduler) are not in it.
  The time between the two hooks of each batch ("in step") is reported apart from the rest ("loop").
- plain: ``zero_grad``, forward, ``F.cross_entropy``, backward, ``step`` for the same batches.

The minor page faults of each side are counted too. By default (``--malloc keep``) the script asks glibc
to keep freed memory in the process: otherwise each step may page-fault its activations back in, and
which side pays depends on the interleaving rather than on the code (see ``_common.keep_freed_memory``).

Logger, checkpointing, progress bar and model summary are off, as the goal is the step itself.
The figures are goals, not gates: never assert them in tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _common import (  # also makes the repository importable
    Batch,
    CycledBatches,
    add_runtime_args,
    minor_faults,
    parse_cfg,
    random_batches,
    setup_runtime,
    summarize,
    sync,
    timing_trainer,
)
from pytorch_lightning.callbacks import Callback
from torch import nn

from lit_prune.module import ImageClassifier


class _PlainLoop:
    """The reference: a bare PyTorch training loop over its own copy of the model and optimizer."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], device: torch.device
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.device = device

    def step(self, i: int) -> tuple[float, int]:
        """Train on batch ``i`` (cycled); return the wall time in seconds and the minor page faults."""
        self.model.train()
        with torch.enable_grad():
            sync(self.device)
            faults, start = minor_faults(), time.perf_counter()
            x, y = self.batches[i % len(self.batches)]
            # .to() is a no-op on CPU; on an accelerator it matches Lightning's per-step transfer
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            sync(self.device)
            return time.perf_counter() - start, minor_faults() - faults


class _InterleavedTimer(Callback):
    """Times the Lightning steps of each epoch and runs as many plain steps between them."""

    def __init__(self, plain: _PlainLoop, steps: int, warmup: int, interleave: str) -> None:
        self.plain = plain
        self.steps = steps
        self.warmup = warmup
        self.interleave = interleave
        # per measured round: seconds, and minor page faults, of each side
        self.lightning_s: list[float] = []  # batch 0 start -> last batch end, less the plain steps
        self.in_step_s: list[float] = []  # sum over batches of batch start -> batch end
        self.plain_s: list[float] = []
        self.lightning_faults: list[int] = []
        self.plain_faults: list[int] = []
        self._round: dict[str, float] = {}
        self._batch_start = self._resume = 0.0
        self._resume_faults = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._round = dict.fromkeys(("lightning", "in_step", "plain", "lightning_faults", "plain_faults"), 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(pl_module.device)
        self._batch_start = time.perf_counter()
        if batch_idx == 0:
            self._resume, self._resume_faults = self._batch_start, minor_faults()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        now, faults = time.perf_counter(), minor_faults()
        # Lightning time runs in segments: from the end of the previous plain step (or batch 0's start)
        # to this batch's end, so the fetch and loop bookkeeping between batches count, the plain step not.
        r = self._round
        r["lightning"] += now - self._resume
        r["lightning_faults"] += faults - self._resume_faults
        r["in_step"] += now - self._batch_start
        if self.interleave == "step":
            self._run_plain([batch_idx])
        self._resume, self._resume_faults = time.perf_counter(), minor_faults()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.interleave == "epoch":
            self._run_plain(range(self.steps))
        if trainer.current_epoch >= self.warmup:
            r = self._round
            self.lightning_s.append(r["lightning"])
            self.in_step_s.append(r["in_step"])
            self.plain_s.append(r["plain"])
            self.lightning_faults.append(int(r["lightning_faults"]))
            self.plain_faults.append(int(r["plain_faults"]))

    def _run_plain(self, indices) -> None:
        for i in indices:
            seconds, faults = self.plain.step(i)
            self._round["plain"] += seconds
            self._round["plain_faults"] += faults


def measure(
    model: str = "cifar_resnet20",
    cfg: Any = None,
    num_classes: int = 10,
    batch_size: int = 64,
    steps: int = 20,
    rounds: int = 7,
    warmup: int = 1,
    num_batches: int = 8,
    device: str = "cpu",
    interleave: str = "step",
    seed: int = 0,
) -> dict[str, Any]:
    """Run the interleaved measurement once.

    Args:
        model: registry name of the zoo model.
        cfg: its width config (name or list); None for the unpruned model.
        num_classes: classifier outputs.
        batch_size: images per batch.
        steps: training steps per side and round.
        rounds: measured rounds (pairs of Lightning epoch + plain steps).
        warmup: leading rounds that are run and discarded.
        num_batches: distinct random batches held in memory, cycled over.
        device: ``"cpu"`` or ``"cuda"``.
        interleave: ``"step"`` (one plain step after each Lightning step) or ``"epoch"`` (the plain steps
            after each Lightning epoch).
        seed: seed of the weights and the random batches.

    Returns:
        The per-round ms/step of both sides, the pairwise ratios and their summary.

    Raises:
        ValueError: on a non-positive count or an unknown ``interleave``.
    """
    if interleave not in ("step", "epoch"):
        raise ValueError(f"interleave must be 'step' or 'epoch', got {interleave!r}")
    if steps < 1 or rounds < 1 or warmup < 0 or num_batches < 1:
        raise ValueError("steps, rounds and num_batches must be >= 1 and warmup >= 0")
    dev = torch.device(device)
    pl.seed_everything(seed, verbose=False)
    # a constant LR keeps both sides on the same arithmetic (same weights, step after step)
    module = ImageClassifier(arch=model, cfg=cfg, num_classes=num_classes, schedule="constant")
    input_size = tuple(getattr(module.model, "input_size", (3, 32, 32)))
    batches = random_batches(num_batches, batch_size, input_size, num_classes, seed)

    # the plain side: same initial weights, same optimizer settings and (constant) LR
    hp = module.hparams
    plain_model = copy.deepcopy(module.model).to(dev)
    plain_opt = torch.optim.SGD(
        plain_model.parameters(),
        lr=hp.lr,
        momentum=hp.momentum,
        weight_decay=hp.weight_decay,
        nesterov=hp.nesterov,
    )
    timer = _InterleavedTimer(_PlainLoop(plain_model, plain_opt, batches, dev), steps, warmup, interleave)

    trainer = timing_trainer(dev, warmup + rounds, timer)
    trainer.fit(module, train_dataloaders=CycledBatches(batches, steps))

    ratios = [a / b for a, b in zip(timer.lightning_s, timer.plain_s, strict=True)]
    stats = summarize(ratios)
    ms = lambda seconds: [1000 * s / steps for s in seconds]
    return {
        "model": model,
        "cfg": cfg,
        "batch_size": batch_size,
        "steps": steps,
        "rounds": rounds,
        "warmup": warmup,
        "device": dev.type,
        "interleave": interleave,
        "threads": torch.get_num_threads(),
        "lightning_ms_per_step": ms(timer.lightning_s),
        "lightning_in_step_ms_per_step": ms(timer.in_step_s),
        "plain_ms_per_step": ms(timer.plain_s),
        "lightning_faults_per_step": [f / steps for f in timer.lightning_faults],
        "plain_faults_per_step": [f / steps for f in timer.plain_faults],
        "ratios": ratios,
        **{f"ratio_{k}": v for k, v in stats.items()},
    }


def _table(r: dict[str, Any]) -> str:
    head = ("round", "lightning ms", "(in step", "loop)", "plain ms", "ratio", "faults/step L", "P")
    rows = ["{:>5} {:>13} {:>9} {:>6} {:>9} {:>6} {:>14} {:>6}".format(*head)]
    columns = ("lightning_ms_per_step", "lightning_in_step_ms_per_step", "plain_ms_per_step", "ratios",
               "lightning_faults_per_step", "plain_faults_per_step")
    for i, (lt, ins, pt, ratio, lf, pf) in enumerate(zip(*(r[c] for c in columns), strict=True)):
        rows.append(f"{i:>5} {lt:>13.2f} {ins:>9.2f} {lt - ins:>6.2f} {pt:>9.2f} {ratio:>6.3f} {lf:>14.0f} {pf:>6.0f}")
    med = statistics.median
    lt, ins, pt = (med(r[c]) for c in columns[:3])
    loop = med(a - b for a, b in zip(r[columns[0]], r[columns[1]], strict=True))
    rows.append(f"{'med':>5} {lt:>13.2f} {ins:>9.2f} {loop:>6.2f} {pt:>9.2f}")
    cfg = f" (cfg {r['cfg']})" if r["cfg"] is not None else ""
    rows.append(
        f"ratio lightning/plain: median {r['ratio_median']:.3f} (min {r['ratio_min']:.3f}, "
        f"max {r['ratio_max']:.3f}, IQR {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}) over {r['rounds']} rounds; "
        f"model {r['model']}{cfg}, batch {r['batch_size']}, {r['steps']} steps/round "
        f"(interleave {r['interleave']}), {r['device']}, threads {r['threads']}, malloc {r['malloc']}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cifar_resnet20", help="registered model name")
    parser.add_argument("--cfg", "--width-config", dest="cfg", help="a registered width-config name or JSON")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps per side and round")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="discarded leading rounds")
    parser.add_argument("--num-batches", type=int, default=8, help="distinct in-memory batches")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--interleave", default="step", choices=("step", "epoch"),
                        help="alternate the sides every step (default) or every epoch")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser)
    args = parser.parse_args(argv)

    malloc = setup_runtime(args)
    result = measure(
        model=args.model,
        cfg=parse_cfg(args.cfg),
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        num_batches=args.num_batches,
        device=args.device,
        interleave=args.interleave,
        seed=args.seed,
    )
    result["malloc"] = malloc
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
