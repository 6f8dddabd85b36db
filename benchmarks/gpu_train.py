"""Per-step time of the paper's CIFAR models on one GPU, classic against the fast path, and what it means for Table 1.

    python benchmarks/gpu_train.py                  # one GPU, under 5 minutes, generated CIFAR-10-shaped data
    python benchmarks/gpu_train.py --models cifar_resnet56 --compile-mode max-autotune-no-cudagraphs
    python benchmarks/gpu_train.py --smoke          # CPU, tiny step counts: checks that the script runs

Everything runs through the toolkit itself: ``ImageClassifier`` (the fast options ``channels_last`` and
``compile``), ``CIFARDataModule`` on a generated CIFAR-10 written in the real on-disk format (random pixels, no
download; ``device: true`` for the device-resident path) and ``pl.Trainer`` (``precision``), with logger,
checkpoints and progress bar off. Printed as it goes:

1. **Per-step time** of ``cifar_resnet56`` and ``cifar_vgg16`` at the paper's batch size (64), ``--steps``
   training steps after ``--warmup`` discarded ones (compilation happens there), and ``--eval-steps``
   validation batches, for three variants:

   (a) ``classic``: fp32, the classic DataLoader (PIL per image, ``--workers`` worker processes), contiguous;
   (b) ``fast``: the device-resident data path, ``precision: bf16-mixed``, ``channels_last``;
   (c) ``compiled``: (b) plus ``compile`` (``torch.compile``, ``--compile-mode``).

   The clock is read after a device synchronisation at the two ends of the timed window only, so the time per
   step includes the data loading, the Lightning loop and every kernel, as a training run pays them.
2. **Concurrent jobs** (measured before (c), whose compilation takes longest: a run that reaches its budget
   loses the least): ``max(--jobs)`` worker processes (this script with ``--worker``) each build the same run
   of the ``--concurrent-variant`` and warm up, then wait; for each K in ``--jobs`` (1, 2, 4, 8), K of them run
   ``--steps`` steps at the same time. Throughput = all their images / (last end - first start). Idle workers
   block on a pipe and use no GPU time. Each worker gets ``cores // max(--jobs)`` threads.
3. **Projection** (the formula is printed with the figures): the time of a 160-epoch run of ResNet-56 and the
   GPU-hours of Table 1 on CIFAR-10 with 5 seeds, the stages and epochs read from the experiment configs
   (``configs/experiments/l1_vgg16.yaml``, ``l1_resnet56.yaml``, ``l1_resnet110.yaml``: large model, fine-tune,
   Scratch-E, Scratch-B with its epochs from the FLOPs ratio of a pruned randomly initialised model, the
   pruned model's test) and each stage's MACs from ``lit_prune.core.flops``.

``--budget`` (seconds, default 210) keeps the run under five minutes: a piece that would start after it is
skipped and says so (the longest piece, compiling ResNet-56, may take a minute or more on its own). Goals
(issue 12), not gates: 160 epochs of ResNet-56 in at most 5 minutes, Table 1 in at most 4 GPU-hours, on one
H100/H200-class GPU. This script has not yet run on a GPU (written and smoke-tested on a CPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _common import ROOT, load_average, quiet_lightning  # puts the repository on sys.path
from data_path import write_cifar10

#: Table 1 (CIFAR-10, L1-norm filter pruning): the experiment configs whose stages are counted
TABLE1 = ("configs/experiments/l1_vgg16.yaml", "configs/experiments/l1_resnet56.yaml",
          "configs/experiments/l1_resnet110.yaml")
MODELS = ("cifar_resnet56", "cifar_vgg16")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
PAPER_BATCH = 64
MSG = "@@ "  # a worker's protocol lines on stdout start with this (Lightning may print too)


@dataclass(frozen=True)
class Variant:
    label: str
    device: bool
    precision: str
    channels_last: bool
    compile: bool


VARIANTS = {
    "classic": Variant("(a) classic fp32", device=False, precision="32-true", channels_last=False, compile=False),
    "fast": Variant("(b) device + bf16 + channels_last", device=True, precision="bf16-mixed", channels_last=True,
                    compile=False),
    "compiled": Variant("(c) (b) + torch.compile", device=True, precision="bf16-mixed", channels_last=True,
                        compile=True),
}


# ---- one run -------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Times ``steps`` training (or validation) batches that follow ``warmup`` discarded ones.

    The device is synchronised only at the two ends of the window, so queued work is not drained in between.
    ``warm_s`` is the time from the loop's start to the end of the warm-up (compilation included).
    """

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        if warmup < 1 or steps < 1:
            raise ValueError(f"warmup and steps must be >= 1, got {warmup} and {steps}")
        self.warmup, self.steps, self.device = warmup, steps, device
        self.count, self.start, self.t0, self.t1 = 0, 0.0, None, None

    @property
    def seconds_per_step(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the run ended after {self.count} of {self.warmup + self.steps} batches")
        return (self.t1 - self.t0) / self.steps

    @property
    def warm_s(self) -> float:
        return (self.t0 or self.start) - self.start

    def _begin(self) -> None:
        self.count, self.start, self.t0, self.t1 = 0, time.perf_counter(), None, None

    def _tick(self) -> None:
        self.count += 1
        if self.count in (self.warmup, self.warmup + self.steps):
            sync(self.device)
            now = time.perf_counter()
            if self.count == self.warmup:
                self.t0 = now
            else:
                self.t1 = now

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tick()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tick()


def build(model: str, variant: Variant, data: str, args: argparse.Namespace):
    """The module and datamodule of one run (the same initial weights for every variant)."""
    from lit_prune.datamodules import CIFARDataModule
    from lit_prune.module import ImageClassifier

    compile_opts: Any = False
    if variant.compile:
        compile_opts = {k: v for k, v in (("mode", args.compile_mode), ("backend", args.compile_backend)) if v}
        compile_opts = compile_opts or True
    torch.manual_seed(0)
    module = ImageClassifier(model, num_classes=10, lr=0.05, schedule="constant", channels_last=variant.channels_last,
                             compile=compile_opts)
    dm = CIFARDataModule(data, batch_size=args.batch_size, num_workers=0 if variant.device else args.workers,
                         verify=False, device=variant.device)
    return module, dm


def trainer_for(device: torch.device, variant: Variant, callback: pl.Callback, **kw: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=variant.precision,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback], **kw)


def measure(model: str, name: str, data: str, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per training step and per validation batch of one variant (and its warm-up time)."""
    variant = VARIANTS[name]
    module, dm = build(model, variant, data, args)
    train = StepTimer(args.warmup, args.steps, device)
    trainer_for(device, variant, train, max_steps=args.warmup + args.steps, limit_val_batches=0).fit(module, dm)
    val = StepTimer(args.warmup, args.eval_steps, device)
    trainer_for(device, variant, val, limit_val_batches=args.warmup + args.eval_steps).validate(module, dm,
                                                                                                 verbose=False)
    return {"train_s": train.seconds_per_step, "eval_s": val.seconds_per_step,
            "warm_s": train.warm_s + val.warm_s}


# ---- concurrent jobs -----------------------------------------------------------------------------------
class Gate(pl.Callback):
    """A worker's clock: after the warm-up it says ``ready`` and waits for ``run N`` (time N steps, report, wait
    again) or ``stop`` on stdin."""

    def __init__(self, warmup: int, batch_size: int, device: torch.device) -> None:
        self.warmup, self.batch_size, self.device = warmup, batch_size, device
        self.count, self.left, self.t0 = 0, None, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1
        if self.left is not None:
            self.left -= 1
            if self.left == 0:
                sync(self.device)
                t1 = time.time()
                say({"t0": self.t0, "t1": t1, "images": self.steps * self.batch_size})
                self._wait(trainer)
        elif self.count == self.warmup:
            say("ready")
            self._wait(trainer)

    def _wait(self, trainer: pl.Trainer) -> None:
        words = sys.stdin.readline().split()
        if not words or words[0] != "run":
            self.left = None
            trainer.should_stop = True
            return
        self.steps = self.left = int(words[1])
        sync(self.device)
        self.t0 = time.time()  # wall clock: comparable between processes


def say(message: Any) -> None:
    print(MSG + json.dumps(message), flush=True)


def worker(args: argparse.Namespace) -> int:
    device = pick_device(args)
    variant = VARIANTS[args.concurrent_variant]
    module, dm = build(args.worker, variant, args.data, args)
    gate = Gate(args.warmup, args.batch_size, device)
    trainer_for(device, variant, gate, max_steps=-1, max_epochs=10**6, limit_val_batches=0).fit(module, dm)
    return 0


class Worker:
    """A ``--worker`` child process and a thread that forwards its protocol lines to a queue."""

    def __init__(self, argv: list[str], threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env=env)
        self.messages: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MSG):
                self.messages.put(json.loads(line[len(MSG):]))
            else:
                self.tail = [*self.tail[-20:], line.rstrip()]
        self.messages.put({"exit": self.proc.wait()})

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def receive(self, timeout: float) -> Any:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"a worker said nothing for {timeout:.0f} s; its last lines:\n" +
                               "\n".join(self.tail)) from None
        if isinstance(message, dict) and "exit" in message:
            raise RuntimeError(f"a worker exited with {message['exit']}; its last lines:\n" + "\n".join(self.tail))
        return message


def concurrency(model: str, data: str, args: argparse.Namespace, deadline: float) -> dict[int, dict[str, float]]:
    """Images/s of K concurrent jobs for each K of ``--jobs`` (one pool of max(K) warmed-up workers)."""
    pool = max(args.jobs)
    threads = max(1, (os.cpu_count() or 1) // pool)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--data", data,
            "--concurrent-variant", args.concurrent_variant, "--batch-size", str(args.batch_size),
            "--warmup", str(args.warmup), "--threads", str(threads), "--workers", str(args.workers)]
    argv += ["--smoke"] if args.smoke else []
    argv += [f"--compile-mode={args.compile_mode}"] if args.compile_mode else []
    argv += [f"--compile-backend={args.compile_backend}"] if args.compile_backend else []
    workers = [Worker(argv, threads) for _ in range(pool)]
    results: dict[int, dict[str, float]] = {}
    try:
        start = time.perf_counter()
        for w in workers:
            if w.receive(timeout=min(max(deadline - time.perf_counter(), 60.0), 900.0)) != "ready":
                raise RuntimeError("a worker did not report ready")
        print(f"  {pool} workers started and warmed up in {time.perf_counter() - start:.0f} s "
              f"({threads} threads each)", flush=True)
        for k in sorted(args.jobs):
            if time.perf_counter() > deadline:
                print(f"  K={k}: skipped (time budget)", flush=True)
                continue
            for w in workers[:k]:
                w.send(f"run {args.steps}")
            reports = [w.receive(timeout=600) for w in workers[:k]]
            images = sum(r["images"] for r in reports)
            span = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
            per_job = [r["images"] / (r["t1"] - r["t0"]) for r in reports]
            results[k] = {"images_per_s": images / span, "per_job_images_per_s": sum(per_job) / k}
            gain = results[k]["images_per_s"] / results[min(results)]["images_per_s"]
            r = results[k]
            print(f"  K={k}: {r['images_per_s']:8,.0f} img/s in all, {r['per_job_images_per_s']:7,.0f} img/s per job; "
                  f"x{gain:.2f} the throughput of K={min(results)}", flush=True)
    finally:
        for w in workers:
            w.send("stop")
        for w in workers:
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
    return results


# ---- Table 1 -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageCost:
    """One stage of Table 1: its model's family and MACs, its training epochs and evaluation passes."""

    experiment: str
    label: str
    family: str  # the measured model it is scaled from: cifar_vgg16 or cifar_resnet56
    macs: int
    dense_macs: int  # the unpruned model of the same architecture (the pessimistic bound)
    epochs: int
    evals: int  # passes over the 10,000 test images: one per epoch (validation) and the final test


def family(arch: str) -> str:
    return "cifar_vgg16" if "vgg" in arch else "cifar_resnet56"


def table1_stages(configs: Sequence[str] = TABLE1) -> list[StageCost]:
    """Every stage of the Table-1 experiments, as the protocol runner plans them.

    Scratch-B's epochs come from the FLOPs ratio of the variant's artifact, which exists only after pruning:
    here the variant's method prunes a randomly initialised large model (L1-norm pruning to fixed per-layer
    fractions: the widths, hence the ratio and the epochs, do not depend on the weights) into the first seed's
    artifact path of a temporary experiment directory, and every seed's Scratch-B gets those epochs.
    """
    from lit_prune.core.flops import count_flops
    from lit_prune.models import create_model
    from lit_prune.protocol.config import load_experiment
    from lit_prune.protocol.layout import LARGE, PRUNE, RunLayout
    from lit_prune.protocol.plan import Planner
    from lit_prune.sources import load_method

    costs: list[StageCost] = []
    with tempfile.TemporaryDirectory(prefix="gpu_train_table1_") as tmp, contextlib.chdir(ROOT):
        for path in configs:  # the configs' paths are relative to the repository
            exp = load_experiment(path)
            layout = RunLayout(Path(tmp) / exp.name)
            planner = Planner(exp, layout)
            arch = planner.large.arch
            torch.manual_seed(0)
            large = create_model(arch, cfg=planner.large_cfg(), num_classes=10)
            dense = count_flops(large).macs
            pruned_macs, budgets = {}, {}
            for v in exp.variants:
                target = layout.artifact(exp.seeds[0], v.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                art = load_method(v.method).prune(large.eval(), path=str(target))
                pruned_macs[v.name] = art.flops.pruned.macs
            for st in planner.stages():
                if st.kind == PRUNE:
                    continue  # one-shot L1 pruning: seconds, no training
                if st.kind == LARGE:
                    costs.append(StageCost(exp.name, st.label, family(arch), dense, dense, st.epochs or 0,
                                           (st.epochs or 0) + 1))
                    continue
                epochs = st.epochs or 0
                if planner.needs_budget(st):
                    if st.variant not in budgets:
                        budgets[st.variant] = planner.scratch_b(replace_seed(st, exp.seeds[0])).epochs
                    epochs = budgets[st.variant]
                costs.append(StageCost(exp.name, st.label, family(arch), pruned_macs[st.variant], dense, epochs,
                                       epochs + 1))
    return costs


def replace_seed(st: Any, seed: int) -> Any:
    """The stage of the first seed (whose artifact exists) in place of ``st``."""
    from dataclasses import replace

    return replace(st, seed=seed)


def reference_macs() -> dict[str, int]:
    from lit_prune.core.flops import count_flops
    from lit_prune.models import create_model

    with torch.device("meta"):
        return {name: count_flops(create_model(name, num_classes=10)).macs for name in MODELS}


def stage_seconds(stage: StageCost, per_image: dict[str, dict[str, float]], ref: dict[str, int], gain: float,
                  pessimistic: bool = False) -> float:
    """GPU seconds of one stage: ``E x 50,000 x t_train + V x 10,000 x t_eval`` per image of its family's
    measured model, times ``M / M_ref`` (``M`` its MACs; the unpruned architecture's when ``pessimistic``),
    divided by the concurrency gain."""
    times = per_image[stage.family]
    macs = stage.dense_macs if pessimistic else stage.macs
    one_job = (stage.epochs * CIFAR_TRAIN * times["train"] + stage.evals * CIFAR_TEST * times["eval"])
    return one_job * macs / ref[stage.family] / gain


def resnet56_epochs(stages: Sequence[StageCost], ref: dict[str, int]) -> float:
    """Table 1's size in ResNet-56 epochs weighted by MACs (training epochs only)."""
    return sum(s.epochs * s.macs / ref["cifar_resnet56"] for s in stages)


def run_160(per_image: dict[str, float], epochs: int = 160) -> float:
    """Seconds of one job of ``epochs`` epochs (50,000 training images, 10,000 validation images each)."""
    return epochs * (CIFAR_TRAIN * per_image["train"] + CIFAR_TEST * per_image["eval"])


FORMULA = """\
projection: per image, t_train = (seconds per training step) / batch and t_eval = (seconds per validation
  batch) / batch, measured above for the stage's family model (cifar_vgg16 for VGG stages, cifar_resnet56 for
  ResNets). One stage of E epochs with V evaluation passes (E validations + the final test) of a model with M
  multiply-accumulates costs, as one job alone on the GPU,
      (E x 50,000 x t_train + V x 10,000 x t_eval) x M / M_ref   seconds,
  and with K jobs sharing the GPU that GPU time divided by the concurrency gain g_K = (images/s of K jobs) /
  (images/s of one job), at the best K measured. Table 1 = the sum over every stage of l1_vgg16, l1_resnet56 and
  l1_resnet110 (5 seeds; the pruning itself is seconds and is left out) / 3600. Low = FLOPs-proportional
  (M = the stage's model); high = a pruned model costs what the unpruned model of its architecture costs
  (M = the unpruned one: at batch 64 the small convolutions are launch-bound, so narrow layers rarely run
  faster in proportion to their FLOPs). ResNet-110 is scaled from ResNet-56 by its MACs in both."""


def project(measured: dict[str, dict[str, dict[str, float]]], gains: dict[str, float], batch: int,
            stages: Sequence[StageCost], ref: dict[str, int]) -> dict[str, Any]:
    """The projection of every variant measured for both families.

    Args:
        measured: ``{model: {variant: {"train_s": s/step, "eval_s": s/batch}}}``.
        gains: ``{variant: g}``, the concurrency gain to apply (1 where not measured).
        batch: images per step.
    """
    out: dict[str, Any] = {}
    for name in VARIANTS:
        if not all(name in measured.get(m, {}) for m in MODELS):
            continue
        per_image = {m: {"train": measured[m][name]["train_s"] / batch, "eval": measured[m][name]["eval_s"] / batch}
                     for m in MODELS}
        row: dict[str, Any] = {"resnet56_160_epochs_s": run_160(per_image["cifar_resnet56"])}
        for key, gain in (("sequential", 1.0), ("concurrent", gains.get(name))):
            if gain is None:
                continue
            row[key] = {"gain": gain,
                        "table1_gpu_hours_low": sum(stage_seconds(s, per_image, ref, gain) for s in stages) / 3600,
                        "table1_gpu_hours_high": sum(stage_seconds(s, per_image, ref, gain, pessimistic=True)
                                                     for s in stages) / 3600,
                        "resnet56_160_epochs_gpu_s": row["resnet56_160_epochs_s"] / gain}
        out[name] = row
    return out


# ---- main ----------------------------------------------------------------------------------------------
def step_times(models: Sequence[str], variants: Sequence[str], measured: dict[str, dict[str, dict[str, float]]],
               data: str, device: torch.device, args: argparse.Namespace, deadline: float) -> None:
    """Measure and print each variant of each model into ``measured[model][variant]``."""
    for model in models:
        for vname in variants:
            label = VARIANTS[vname].label
            if time.perf_counter() > deadline:
                print(f"  {model:15} {label:36} skipped (time budget)", flush=True)
                continue
            try:
                m = measure(model, vname, data, device, args)
            except Exception as err:  # one variant failing (a compile error) must not hide the others
                print(f"  {model:15} {label:36} FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            measured.setdefault(model, {})[vname] = m
            base = measured[model].get("classic")
            vs = f" | x{base['train_s'] / m['train_s']:.2f} vs (a)" if base and vname != "classic" else ""
            print(f"  {model:15} {label:36} {1e3 * m['train_s']:8.2f} ms; {1e3 * m['eval_s']:7.2f} ms | "
                  f"{args.batch_size / m['train_s']:8,.0f} img/s | warm-up {m['warm_s']:5.1f} s{vs}", flush=True)


def pick_device(args: argparse.Namespace) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if not args.smoke:
        raise SystemExit("gpu_train.py measures a GPU and none is visible (torch.cuda.is_available() is False); "
                         "--smoke runs it on the CPU with tiny step counts, to check that it runs")
    return torch.device("cpu")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=PAPER_BATCH, help="the paper's CIFAR batch: 64")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per measurement")
    p.add_argument("--eval-steps", type=int, default=50, help="timed validation batches per measurement")
    p.add_argument("--warmup", type=int, default=30, help="discarded steps first (compilation happens there)")
    p.add_argument("--images", type=int, default=CIFAR_TRAIN, help="generated training images (CIFAR-10's 50,000)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes of the classic variant")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent jobs K to measure")
    p.add_argument("--concurrent-variant", default="fast", choices=list(VARIANTS),
                   help="what the concurrent jobs run (default fast: compiling in every worker costs minutes)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: torch's; --smoke: "
                   "aot_eager, no code generation)")
    p.add_argument("--budget", type=float, default=None, help="seconds after which the remaining pieces are skipped "
                   "(default 210; none with --smoke)")
    p.add_argument("--smoke", action="store_true", help="CPU allowed, tiny counts: 2 steps, batch 8, K = 1 2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a concurrent job: the model it runs
    p.add_argument("--data", help=argparse.SUPPRESS)  # the generated CIFAR folder a worker reads
    args = p.parse_args(argv)
    if args.smoke and args.worker is None:
        args.steps, args.eval_steps, args.warmup, args.batch_size = 2, 2, 1, 8
        args.images, args.jobs, args.workers = 64, [1, 2], 0
        args.compile_backend = args.compile_backend or "aot_eager"
    if args.budget is None:
        args.budget = math.inf if args.smoke else 210.0
    if min(args.jobs) < 1 or min(args.steps, args.eval_steps, args.warmup, args.batch_size) < 1:
        p.error("--jobs, --steps, --eval-steps, --warmup and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    if args.worker is not None:
        return worker(args)
    device = pick_device(args)
    start = time.perf_counter()
    deadline = start + args.budget
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name} | torch {torch.__version__} | batch {args.batch_size}, {args.steps} steps (+{args.warmup} warm-up), "
          f"{args.eval_steps} validation batches | generated CIFAR-10-shaped data, {args.images} images"
          + (" | SMOKE (tiny counts, not a measurement)" if args.smoke else ""), flush=True)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "args": {
        k: v for k, v in vars(args).items() if k not in ("worker", "data")}, "load_before": load_average()}
    measured: dict[str, dict[str, dict[str, float]]] = {}
    concurrent: dict[str, dict[int, dict[str, float]]] = {}
    tmp = tempfile.mkdtemp(prefix="gpu_train_")
    try:
        write_cifar10(Path(tmp), args.images, num_test=args.batch_size * (args.warmup + args.eval_steps))
        # the uncompiled variants, the concurrent jobs, then the compiled variant: compilation takes the longest,
        # so a run that reaches its budget loses the least
        early = [v for v in args.variants if not VARIANTS[v].compile]
        late = [v for v in args.variants if VARIANTS[v].compile]
        print("\nper-step time (ms per training step; per validation batch), images/s of training", flush=True)
        step_times(args.models, early, measured, tmp, device, args, deadline)
        print(f"\nconcurrent jobs of variant {VARIANTS[args.concurrent_variant].label}, K = {args.jobs}", flush=True)
        for model in args.models:
            if time.perf_counter() > deadline:
                print(f"  {model}: skipped (time budget)", flush=True)
                continue
            print(f" {model}:", flush=True)
            try:
                concurrent[model] = concurrency(model, tmp, args, deadline)
            except (RuntimeError, TimeoutError) as err:
                print(f"  FAILED: {err}", flush=True)
        if late:
            print("\nper-step time, compiled", flush=True)
            step_times(args.models, late, measured, tmp, device, args, deadline)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(tmp, ignore_errors=True)
    result["per_step"] = measured
    result["concurrent"] = {m: {str(k): v for k, v in r.items()} for m, r in concurrent.items()}

    stages = table1_stages()
    ref = reference_macs()
    result["table1"] = {"stages": len(stages), "training_epochs": sum(s.epochs for s in stages),
                        "resnet56_epoch_equivalents": resnet56_epochs(stages, ref),
                        "scratch_b_epochs": {f"{s.experiment} {s.label.split(' | ')[1]}": s.epochs for s in stages
                                             if s.label.endswith("scratch_b")}}
    t1 = result["table1"]
    print(f"\nTable 1 (CIFAR-10, 5 seeds): {len(stages)} stages, {t1['training_epochs']:,} training epochs "
          f"= {t1['resnet56_epoch_equivalents']:,.0f} ResNet-56 epochs weighted by MACs")
    gains = {}
    if concurrent and all(m in concurrent and concurrent[m] for m in MODELS):
        # the gain of the best K (largest throughput), per family, applied to that family's stages: the smaller
        # of the two families' gains is used for both, to stay on the safe side
        best = {m: max(r.values(), key=lambda x: x["images_per_s"])["images_per_s"] / r[min(r)]["images_per_s"]
                for m, r in concurrent.items()}
        gains[args.concurrent_variant] = min(best.values())
        result["concurrency_gain"] = best
    projection = project(measured, gains, args.batch_size, stages, ref)
    result["projection"] = projection
    print(FORMULA)
    for vname, row in projection.items():
        line = f"  {VARIANTS[vname].label:36} ResNet-56, 160 epochs: {row['resnet56_160_epochs_s'] / 60:6.1f} min alone"
        for key in ("sequential", "concurrent"):
            if key in row:
                r = row[key]
                what = "one job at a time" if key == "sequential" else f"x{r['gain']:.2f} with concurrent jobs"
                line += (f" | Table 1 {r['table1_gpu_hours_low']:6.1f}-{r['table1_gpu_hours_high']:6.1f} GPU-h ({what}"
                         + (f", 160 epochs {r['resnet56_160_epochs_gpu_s'] / 60:.1f} GPU-min)" if key == "concurrent"
                            else ")"))
        print(line, flush=True)
    if not projection:
        print("  (no variant was measured on both models: nothing to project)")
    result["load_after"] = load_average()
    result["seconds"] = time.perf_counter() - start
    print(f"\ntotal {result['seconds']:.0f} s | goals (issue 12, one H100/H200): ResNet-56 160 epochs <= 5 min, "
          "Table 1 <= 4 GPU-hours | load average before "
          f"{result['load_before']}, after {result['load_after']}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
