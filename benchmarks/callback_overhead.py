"""Per-step training overhead of each pruning callback against the same run without it.

    python benchmarks/callback_overhead.py --threads 1                # cifar_resnet20, batch 64, all callbacks
    python benchmarks/callback_overhead.py --model cifar_vgg16 --callbacks masks slimming --steps 4 --json

Callbacks measured (``--callbacks``):

- ``l1``: ``callbacks.L1FilterPruning(prune_ratio=0.5)``: nothing per step, prunes when training ends.
- ``slimming``: ``callbacks.NetworkSlimming(sparsity=1e-4)``: adds ``s * sign(gamma)`` to every BN's
  gamma gradient before each optimizer step.
- ``sfp``: ``callbacks.SoftFilterPruning(prune_ratio=0.3, interval=1)``: nothing per step, re-prunes
  after each epoch's last step; that re-prune is timed on its own.
- ``masks``: a ``PruningCallback`` subclass holding 50% random unstructured masks on every conv weight:
  every step masks the gradients (``on_before_optimizer_step``) and re-masks the weights and the momentum
  (``on_train_batch_end``).
- ``masks-float`` (not in the default set): the same masks held as float32 instead of bool. The library
  multiplies by bool masks, which takes a slower mixed-dtype path; this prices that choice.

Design: one ``trainer.fit`` per callback, with the callback toggled *per step* by a wrapper (``_Toggled``).
Both sides are then the same model, optimizer, batches, Trainer and process: the only difference
between an "on" and an "off" step is whether the callback's per-step hooks run. Each epoch is a round of
``2 * steps + 1`` batches: the first ``2 * steps`` alternate on/off (on first in even epochs, off first
in odd ones), the last batch is untimed and always on, because it carries the once-per-epoch work (SFP's
re-prune), which is reported apart. A step is timed from its ``on_train_batch_start`` to the next batch's
``on_train_batch_start``, so it includes everything Lightning does per step, the callback's hooks
included. Step ``2k`` and ``2k + 1`` form a pair; the figure is the median over all pairs of
``on / off``, with its interquartile range and the min/max of the per-round ratios (sum on / sum off).

Besides that interleaved ratio the wrapper times the callback's own hooks on the "on" steps ("hooks
ms"): a direct, much less noisy measure of what the callback adds (it misses only indirect effects such
as cache pollution). The wrapper itself runs on both sides, so its dispatch cost (microseconds) cancels.

Not measured: ``on_fit_start``/``on_train_start`` (FLOPs count, SFP's first selection) and the
end-of-training prune and export (see ``inference_speedup.py``'s export column); ``on_train_end`` is not
forwarded. Logger, checkpointing, progress bar and model summary are off. The figures are goals (under
3% per step), not gates: never assert them in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from _common import (  # also makes the repository importable
    CycledBatches,
    add_runtime_args,
    load_average,
    parse_cfg,
    random_batches,
    setup_runtime,
    spread,
    summarize,
    sync,
    timing_trainer,
)
from pytorch_lightning.callbacks import Callback
from torch import nn

from callbacks import L1FilterPruning, NetworkSlimming, PruningCallback, SoftFilterPruning
from lit_prune.callbacks.base import unwrap
from lit_prune.module import ImageClassifier

# hooks Lightning calls once per training step: forwarded on "on" steps only
_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_zero_grad",
               "on_before_optimizer_step", "on_train_batch_end")
# set-up hooks: always forwarded, never inside a timed step (on_train_end is left out; the per-epoch hooks
# are forwarded by _Toggled's own methods)
_OTHER_HOOKS = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start")


class RandomMasks(PruningCallback):
    """Unstructured random masks on every conv weight, enforced every step by :class:`PruningCallback`.

    Stands for every masked method (unstructured pruning, lottery tickets, slimming's mask mode): the
    base class masks gradients before each optimizer step and re-masks weights and momentum after it.

    Args:
        amount: fraction of each conv weight masked out.
        seed: seed of the masks.
        dtype: dtype the masks are held in: ``torch.bool`` as the library stores them, or the weights'
            float dtype, to show what multiplying by a same-dtype mask would cost (``masks-float``).
    """

    method = "random_masks"

    def __init__(self, amount: float = 0.5, seed: int = 0, dtype: torch.dtype = torch.bool) -> None:
        super().__init__(artifact_path=None)
        self.amount, self.seed, self.dtype = amount, seed, dtype

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        gen = torch.Generator().manual_seed(self.seed)
        convs = [(n, m) for n, m in unwrap(pl_module).named_modules() if isinstance(m, nn.Conv2d)]
        # bool masks of the weight's full shape (C_out, C_in, kh, kw); on_train_start applies them
        self.masks = {f"{n}.weight": (torch.rand(m.weight.shape, generator=gen) >= self.amount).to(self.dtype)
                      for n, m in convs}


CALLBACKS: dict[str, tuple[str, Callable[[], Callback]]] = {
    "l1": ("L1FilterPruning(prune_ratio=0.5)", lambda: L1FilterPruning(prune_ratio=0.5, artifact_path=None)),
    "slimming": (
        "NetworkSlimming(sparsity=1e-4)",
        lambda: NetworkSlimming(sparsity=1e-4, prune_at_end=False, artifact_path=None, histogram_every_n_epochs=0),
    ),
    "sfp": (
        "SoftFilterPruning(prune_ratio=0.3, interval=1)",
        lambda: SoftFilterPruning(prune_ratio=0.3, interval=1, artifact_path=None, masked_artifact_path=None),
    ),
    "masks": ("PruningCallback + 50% random conv masks", lambda: RandomMasks(amount=0.5)),
    # not in the default set: the same masks held as float32, to price the bool -> float promotion
    "masks-float": ("the same with float32 masks", lambda: RandomMasks(amount=0.5, dtype=torch.float32)),
}
DEFAULT_CALLBACKS = ["l1", "slimming", "sfp", "masks"]


class _Toggled(Callback):
    """Runs ``inner``'s per-step hooks on alternate steps and times the steps of both kinds.

    Per epoch of ``2 * steps + 1`` batches: batches ``0 .. 2 * steps - 1`` alternate on/off (phase
    flipped every epoch), the last one is always on and untimed (the epoch's end work happens there).
    """

    def __init__(self, inner: Callback, steps: int, warmup: int) -> None:
        self.inner, self.steps, self.warmup = inner, steps, warmup
        self.enabled = False
        # per measured round (epoch): the step times (s) of each side in pair order, and hook seconds
        self.on_s: list[list[float]] = []
        self.off_s: list[list[float]] = []
        self.hooks_s: list[float] = []  # time inside inner's per-step hooks on the "on" steps, per round
        self.epoch_end_s: list[float] = []  # the last batch's inner on_train_batch_end + on_train_epoch_end
        self._start = 0.0
        self._hooks = 0.0
        self._epoch_end = 0.0
        self._round_on: list[float] = []
        self._round_off: list[float] = []
        for name in _OTHER_HOOKS:
            setattr(self, name, self._forward(name))
        for name in _STEP_HOOKS[1:-1]:
            setattr(self, name, self._forward_if_enabled(name))

    def _forward(self, name: str) -> Callable[..., None]:
        def hook(*args: Any, **kwargs: Any) -> None:
            getattr(self.inner, name)(*args, **kwargs)

        return hook

    def _forward_if_enabled(self, name: str) -> Callable[..., None]:
        def hook(*args: Any, **kwargs: Any) -> None:
            if self.enabled:
                start = time.perf_counter()
                getattr(self.inner, name)(*args, **kwargs)
                self._hooks += time.perf_counter() - start

        return hook

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.inner.on_train_epoch_start(trainer, pl_module)
        self._round_on, self._round_off = [], []
        self._hooks = self._epoch_end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        sync(pl_module.device)
        now = time.perf_counter()
        if batch_idx > 0 and batch_idx <= 2 * self.steps:  # close the previous (timed) step
            (self._round_on if self.enabled else self._round_off).append(now - self._start)
        last = batch_idx >= 2 * self.steps
        self.enabled = last or (batch_idx + trainer.current_epoch) % 2 == 0
        self._start = now
        if self.enabled:
            start = time.perf_counter()
            self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)
            if not last:
                self._hooks += time.perf_counter() - start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.enabled:
            start = time.perf_counter()
            self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            sync(pl_module.device)
            seconds = time.perf_counter() - start
            if batch_idx >= 2 * self.steps:
                self._epoch_end += seconds
            else:
                self._hooks += seconds

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        self.inner.on_train_epoch_end(trainer, pl_module)
        self._epoch_end += time.perf_counter() - start
        if trainer.current_epoch >= self.warmup:
            if len(self._round_on) != self.steps or len(self._round_off) != self.steps:
                raise RuntimeError(f"expected {self.steps} timed steps per side, got {len(self._round_on)} on "
                                   f"and {len(self._round_off)} off (did the epoch stop early?)")
            self.on_s.append(self._round_on)
            self.off_s.append(self._round_off)
            self.hooks_s.append(self._hooks)
            self.epoch_end_s.append(self._epoch_end)


def measure_one(
    key: str,
    model: str = "cifar_resnet20",
    cfg: Any = None,
    num_classes: int = 10,
    batch_size: int = 64,
    steps: int = 8,
    rounds: int = 5,
    warmup: int = 1,
    num_batches: int = 4,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Fit once with callback ``key`` toggled per step; return the step times, ratios and their summary.

    Args:
        key: one of :data:`CALLBACKS`.
        model: registry name of the zoo model.
        cfg: its width config (name or list); None for the unpruned model.
        num_classes: classifier outputs.
        batch_size: images per batch.
        steps: timed steps per side and round (an epoch has ``2 * steps + 1`` batches).
        rounds: measured rounds (epochs).
        warmup: leading epochs run and discarded.
        num_batches: distinct random batches held in memory, cycled over.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seed of the weights and the batches.

    Raises:
        ValueError: an unknown callback or a non-positive count.
    """
    if key not in CALLBACKS:
        raise ValueError(f"unknown callback {key!r}; choose from {', '.join(CALLBACKS)}")
    if steps < 1 or rounds < 1 or warmup < 0 or num_batches < 1:
        raise ValueError("steps, rounds and num_batches must be >= 1 and warmup >= 0")
    dev = torch.device(device)
    pl.seed_everything(seed, verbose=False)
    module = ImageClassifier(arch=model, cfg=cfg, num_classes=num_classes, schedule="constant")
    input_size = tuple(getattr(module.model, "input_size", (3, 32, 32)))
    batches = random_batches(num_batches, batch_size, input_size, num_classes, seed)
    label, make = CALLBACKS[key]
    toggled = _Toggled(make(), steps, warmup)
    trainer = timing_trainer(dev, warmup + rounds, toggled)
    trainer.fit(module, train_dataloaders=CycledBatches(batches, 2 * steps + 1))

    pairs = [a / b for on, off in zip(toggled.on_s, toggled.off_s, strict=True) for a, b in zip(on, off, strict=True)]
    per_round = [sum(on) / sum(off) for on, off in zip(toggled.on_s, toggled.off_s, strict=True)]
    ms = lambda seconds: 1000 * seconds
    return {
        "callback": key,
        "label": label,
        "on_ms": [[ms(s) for s in r] for r in toggled.on_s],
        "off_ms": [[ms(s) for s in r] for r in toggled.off_s],
        "on_ms_median": ms(statistics.median(s for r in toggled.on_s for s in r)),
        "off_ms_median": ms(statistics.median(s for r in toggled.off_s for s in r)),
        "hooks_ms_per_step": [ms(h) / steps for h in toggled.hooks_s],
        "epoch_end_ms": [ms(s) for s in toggled.epoch_end_s],
        "pair_ratios": pairs,
        "pair": summarize(pairs),
        "round_ratios": per_round,
        "round": summarize(per_round),
    }


def measure(
    callbacks: list[str] | None = None,
    model: str = "cifar_resnet20",
    cfg: Any = None,
    batch_size: int = 64,
    steps: int = 8,
    rounds: int = 5,
    warmup: int = 1,
    epoch_steps: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`measure_one` for each callback (default: ``DEFAULT_CALLBACKS``), plus the run's settings.

    Args:
        epoch_steps: steps of a real epoch, to amortise the once-per-epoch work over (default: a
            CIFAR-10 epoch, ``ceil(50000 / batch_size)``).
        kwargs: passed on to :func:`measure_one`.
    """
    keys = list(callbacks or DEFAULT_CALLBACKS)
    epoch_steps = epoch_steps or -(-50000 // batch_size)
    results = [measure_one(k, model=model, cfg=cfg, batch_size=batch_size, steps=steps, rounds=rounds,
                           warmup=warmup, **kwargs) for k in keys]
    for r in results:  # once-per-epoch work spread over a real epoch, relative to an "off" step
        r["epoch_end_amortised_pct"] = 100 * statistics.median(r["epoch_end_ms"]) / epoch_steps / r["off_ms_median"]
    return {
        "model": model,
        "cfg": cfg,
        "batch_size": batch_size,
        "steps": steps,
        "rounds": rounds,
        "warmup": warmup,
        "epoch_steps": epoch_steps,
        "threads": torch.get_num_threads(),
        "results": results,
    }


def _table(res: dict[str, Any]) -> str:
    head = ("callback", "off ms", "on ms", "hooks ms", "overhead", "IQR", "rounds min..max", "epoch-end ms")
    rows = ["{:<10} {:>8} {:>8} {:>9} {:>9} {:>16} {:>16} {:>13}".format(*head)]
    pct = lambda x: f"{100 * (x - 1):+.1f}%"
    for r in res["results"]:
        p, q = r["pair"], r["round"]
        rows.append(
            f"{r['callback']:<10} {r['off_ms_median']:>8.1f} {r['on_ms_median']:>8.1f} "
            f"{statistics.median(r['hooks_ms_per_step']):>9.2f} {pct(p['median']):>9} "
            f"{pct(p['q1']) + '..' + pct(p['q3']):>16} {pct(q['min']) + '..' + pct(q['max']):>16} "
            f"{statistics.median(r['epoch_end_ms']):>13.1f}"
        )
    rows.append("")
    for r in res["results"]:
        hooks = statistics.median(r["hooks_ms_per_step"])
        rows.append(
            f"{r['callback']}: {r['label']}; on/off per step {spread(r['pair'])} over {len(r['pair_ratios'])} pairs, "
            f"per round {spread(r['round'])}; hooks {hooks:.2f} ms/step = {100 * hooks / r['off_ms_median']:.2f}% "
            f"of a step; epoch-end work {statistics.median(r['epoch_end_ms']):.1f} ms = "
            f"{r['epoch_end_amortised_pct']:.3f}% per step over a {res['epoch_steps']}-step epoch"
        )
    cfg = f" (cfg {res['cfg']})" if res["cfg"] is not None else ""
    parts = ", ".join(f"{r['callback']} {100 * (r['pair']['median'] - 1):+.1f}%" for r in res["results"])
    rows.append(
        f"per-step overhead (median on/off - 1, target < 3%): {parts}; model {res['model']}{cfg}, batch "
        f"{res['batch_size']}, {res['steps']} pairs x {res['rounds']} rounds, threads {res['threads']}, "
        f"malloc {res['malloc']}, load {res['load_before']} -> {res['load_after']}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callbacks", nargs="+", choices=list(CALLBACKS), default=DEFAULT_CALLBACKS,
                        help=f"callbacks to measure (default: {' '.join(DEFAULT_CALLBACKS)})")
    parser.add_argument("--model", default="cifar_resnet20", help="registered model name")
    parser.add_argument("--cfg", "--width-config", dest="cfg", help="a registered width-config name or JSON")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (epochs) per callback")
    parser.add_argument("--warmup", type=int, default=1, help="discarded leading epochs")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct in-memory batches")
    parser.add_argument("--epoch-steps", type=int, default=None,
                        help="steps of a real epoch for amortising the epoch-end work (default: CIFAR-10's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser)
    args = parser.parse_args(argv)

    malloc = setup_runtime(args)
    load_before = load_average()
    result = measure(
        callbacks=args.callbacks,
        model=args.model,
        cfg=parse_cfg(args.cfg),
        batch_size=args.batch_size,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        epoch_steps=args.epoch_steps,
        num_classes=args.num_classes,
        num_batches=args.num_batches,
        device=args.device,
        seed=args.seed,
    )
    result.update(malloc=malloc, load_before=load_before, load_after=load_average())
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
