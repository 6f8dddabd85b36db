"""Helpers shared by the benchmark scripts: batches, timing, glibc settings, ratio statistics, CLI set-up.

Every script here compares two (or more) sides in one process, interleaved (A B A B ...), and reports the
median of the pairwise ratios with their spread: on a shared machine the same ratio swings by 30% from
one run to the next, and only sides measured side by side see the same machine state.

The scripts import this module as ``_common`` (``python benchmarks/<script>.py`` puts ``benchmarks/`` on
``sys.path``); importing it also makes the repository importable without installing it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # not on Windows: page faults are then reported as 0
    resource = None

import torch

# a script in benchmarks/: make the repository importable without installing it
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Batch = tuple[torch.Tensor, torch.Tensor]


class CycledBatches:
    """``steps`` batches per epoch, cycling over a fixed list (no collation, no workers).

    Used as Lightning's train dataloader; a plain loop can index the same list.
    """

    def __init__(self, batches: list[Batch], steps: int) -> None:
        self.batches = batches
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def random_batches(
    num_batches: int, batch_size: int, input_size: Sequence[int], num_classes: int, seed: int
) -> list[Batch]:
    """``num_batches`` pairs of N(0, 1) images ``(batch_size, *input_size)`` and random labels."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, *input_size, generator=gen),
            torch.randint(num_classes, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]


def timing_trainer(device: torch.device, epochs: int, callback: Any) -> Any:
    """A Trainer that only trains (no validation, logging, checkpoints or progress bar): what timings need."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def sync(device: torch.device) -> None:
    """Wait for queued accelerator work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of handing it back to the OS.

    By default glibc serves large blocks (CNN activations: megabytes each) with ``mmap`` or trims the
    top of its heap once enough is free, so a training step can page-fault its activations in again,
    thousands of faults per step. Which side of an interleaved pair pays depends on who freed last, not
    on the code being measured (measured: ~8,000 faults and ~5% per step on the Lightning side, none
    on the plain side, of cifar_resnet20 at batch 64; each side alone faults too). With both settings
    neither side faults in steady state. jemalloc/tcmalloc, or ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<big>`` in the environment, do the same for whole runs.

    Returns:
        Whether both settings were accepted (False off glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_trim_threshold, 2**30)) and bool(mallopt(m_mmap_max, 0))


def parse_cfg(text: str | None) -> Any:
    """A ``--cfg`` argument: JSON (a width list) or a registered width-config name such as ``"A"``."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def quiet_lightning() -> None:
    """Silence Trainer start-up chatter and the warnings a benchmark without val loop or logger triggers."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric", "callbacks"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning 2.6 on recent torch


def summarize(ratios: Sequence[float]) -> dict[str, float]:
    """Median, min, max and interquartile range (inclusive quartiles) of pairwise ratios."""
    if not ratios:
        raise ValueError("no ratios to summarize")
    q1 = q3 = ratios[0]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "q1": q1, "q3": q3}


def spread(s: Mapping[str, float], digits: int = 3) -> str:
    """``"median 1.234 (min ..., max ..., IQR ...-...)"`` of a :func:`summarize` result."""
    f = f"{{:.{digits}f}}"
    return (f"median {f.format(s['median'])} (min {f.format(s['min'])}, max {f.format(s['max'])}, "
            f"IQR {f.format(s['q1'])}-{f.format(s['q3'])})")


def alternate(
    sides: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Run each side once per round, interleaved, and return their wall times (seconds) per round.

    The order of the sides is rotated every round (A B C, B C A, C A B, ...) so that no side always runs
    right after the same other one (caches, allocator state, turbo). The first ``warmup`` rounds are run
    and discarded.

    Args:
        sides: name -> a call to time (one forward pass, one export, ...).
        rounds: measured rounds.
        warmup: leading rounds that are discarded.
        device: synchronised around each call when it is an accelerator.

    Returns:
        ``{name: [seconds of round 0, round 1, ...]}`` over the measured rounds.
    """
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    dev = device if device is not None else torch.device("cpu")
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(dev)
            start = time.perf_counter()
            sides[name]()
            sync(dev)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--malloc`` and ``--json``, common to every script."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--malloc", default="keep", choices=("keep", "default"),
                        help="keep freed memory in the process (default, see _common.keep_freed_memory) or "
                        "glibc's default, which returns it to the OS")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def setup_runtime(args: argparse.Namespace) -> str:
    """Apply ``--threads`` and ``--malloc``, quieten Lightning; return the malloc setting in effect."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    if args.malloc == "keep":
        return "keep" if keep_freed_memory() else "default (mallopt unavailable)"
    return "default"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS does not tell)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
