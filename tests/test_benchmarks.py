"""The benchmarks' machinery (interleaving, callback toggling, width rounding, gamma recipe); never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common  # noqa: E402
import callback_overhead  # noqa: E402
import gpu_train  # noqa: E402
import inference_speedup  # noqa: E402

from callbacks import NetworkSlimming  # noqa: E402
from lit_prune.models import create_model  # noqa: E402
from lit_prune.module import ImageClassifier  # noqa: E402


def _tiny() -> ImageClassifier:
    # a two-layer net: the tests check the hooks, not the model, and a small one keeps them fast
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return ImageClassifier(model=net, schedule="constant")


def _trainer(callback: pl.Callback, epochs: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback])


def test_alternate_rotates_the_order_and_drops_warmup():
    calls: list[str] = []
    sides = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    times = _common.alternate(sides, rounds=2, warmup=1)
    assert calls == list("ABC" "BCA" "CAB")
    assert {k: len(v) for k, v in times.items()} == {"A": 2, "B": 2, "C": 2}


def test_summarize_quartiles():
    s = _common.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 100.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        _common.summarize([])


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def _rec(self, name, trainer, batch_idx=-1):
        self.calls.append((name, trainer.current_epoch, batch_idx))

    def on_fit_start(self, trainer, pl_module):
        self._rec("fit_start", trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._rec("batch_start", trainer, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._rec("before_opt", trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._rec("batch_end", trainer, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self._rec("epoch_end", trainer)

    def on_train_end(self, trainer, pl_module):
        self._rec("train_end", trainer)


def test_toggled_runs_the_inner_callback_on_alternate_steps():
    steps = 2  # epochs of 2 * 2 + 1 = 5 batches
    inner = _Recorder()
    toggled = callback_overhead._Toggled(inner, steps=steps, warmup=1)
    module = _tiny()
    batches = _common.random_batches(2, 2, (3, 32, 32), 10, seed=0)
    _trainer(toggled, epochs=3).fit(module, train_dataloaders=_common.CycledBatches(batches, 2 * steps + 1))

    starts = [(e, b) for name, e, b in inner.calls if name == "batch_start"]
    # on first in even epochs, off first in odd ones; the last (untimed) batch always on
    assert starts == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (1, 4), (2, 0), (2, 2), (2, 4)]
    assert sum(name == "before_opt" for name, _, _ in inner.calls) == 9
    assert [(e, b) for name, e, b in inner.calls if name == "batch_end"] == starts
    names = [name for name, _, _ in inner.calls]
    assert names.count("fit_start") == 1 and names.count("epoch_end") == 3
    assert "train_end" not in names  # the end-of-training prune is not a step cost
    # one warm-up epoch dropped; per measured epoch `steps` timed steps on each side
    assert [len(r) for r in toggled.on_s] == [steps, steps] and [len(r) for r in toggled.off_s] == [steps, steps]
    assert len(toggled.hooks_s) == len(toggled.epoch_end_s) == 2


def test_random_masks_callback_keeps_masked_weights_zero():
    cb = callback_overhead.RandomMasks(amount=0.5, seed=0)
    module = _tiny()
    batches = _common.random_batches(2, 2, (3, 32, 32), 10, seed=0)
    _trainer(cb, epochs=1).fit(module, train_dataloaders=_common.CycledBatches(batches, 2))
    convs = {f"{n}.weight": m.weight for n, m in module.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(cb.masks) == set(convs)
    masked = sum(int((~m).sum()) for m in cb.masks.values()) / sum(m.numel() for m in cb.masks.values())
    assert 0.4 < masked < 0.6
    for name, w in convs.items():
        assert torch.all(w[~cb.masks[name]] == 0), name


def test_round_cfg():
    cfg = [6, 6, 0, 16, 22, 57, 64]
    dense = [16, 16, 16, 16, 32, 64, 64]
    assert inference_speedup.round_cfg(cfg, dense, 8) == [8, 8, 0, 16, 24, 64, 64]
    assert inference_speedup.round_cfg([62, "M", 61], [64, "M", 62], 8) == [64, "M", 62]  # capped at dense
    with pytest.raises(ValueError):
        inference_speedup.round_cfg([1, 2], [3], 8)


def test_sparse_gammas_give_uneven_widths_under_slimming():
    model = create_model("slim_vgg19")
    inference_speedup.sparse_gammas(model, seed=0)
    keeps = NetworkSlimming(prune_ratio=0.7, artifact_path=None).select(model)
    kept = [int(k.sum()) for k in keeps.values()]
    sizes = [k.numel() for k in keeps.values()]
    assert abs(sum(kept) - 0.3 * sum(sizes)) < 2  # the global threshold keeps 30% of all channels
    assert min(kept) > 0
    fractions = [k / s for k, s in zip(kept, sizes)]
    assert fractions[0] > 0.8 and fractions[-1] < 0.2  # wide early layers, thin late ones
    assert any(k % 8 for k in kept)  # odd widths, as sparsity training gives


def test_measure_model_exports_and_times_all_sides():
    res = inference_speedup.measure_model("resnet56-B", [2], rounds=1, warmup=0, round_to=8, export_repeats=1,
                                          breakdown_repeats=1)
    assert res["cfg"][:7] == [6] * 7
    assert all(w % 8 == 0 for w in res["rounded_cfg"])
    assert res["flops_ratio"] > res["rounded_flops_ratio"] > 1
    (row,) = res["batches"]
    assert len(row["dense_ms"]) == len(row["pruned_ms"]) == len(row["rounded_ms"]) == 1
    assert set(res["export_ms"]) == {"select", "export", "write", "total"}
    # every conv and the linear of the pruned ResNet-56 (55 convs, 1 fc) is accounted for by shape
    shapes = res["breakdown"]["pruned"]["shapes"]
    assert sum(v["layers"] for v in shapes.values()) == 56
    assert shapes["16->6@32x32"]["layers"] == 7


def test_gpu_train_projection_follows_its_formula():
    ref = {"cifar_resnet56": 100, "cifar_vgg16": 300}
    stages = [gpu_train.StageCost("r", "seed 0 | large", "cifar_resnet56", 100, 100, epochs=160, evals=161),
              gpu_train.StageCost("r", "seed 0 | B | scratch_b", "cifar_resnet56", 50, 100, epochs=220, evals=221),
              gpu_train.StageCost("v", "seed 0 | large", "cifar_vgg16", 300, 300, epochs=160, evals=161)]
    measured = {"cifar_resnet56": {"fast": {"train_s": 64e-4, "eval_s": 32e-4}},
                "cifar_vgg16": {"fast": {"train_s": 128e-4, "eval_s": 64e-4}, "classic": {"train_s": 1, "eval_s": 1}}}
    out = gpu_train.project(measured, {"fast": 2.0}, 64, stages, ref)
    assert set(out) == {"fast"}  # classic was not measured on both models
    # per image: ResNet-56 1e-4 s training, 5e-5 s evaluation; VGG-16 twice that
    large56 = 160 * 50_000 * 1e-4 + 161 * 10_000 * 5e-5
    pruned56 = (220 * 50_000 * 1e-4 + 221 * 10_000 * 5e-5) * 50 / 100
    vgg = 160 * 50_000 * 2e-4 + 161 * 10_000 * 1e-4
    row = out["fast"]
    assert row["resnet56_160_epochs_s"] == pytest.approx(160 * (50_000 * 1e-4 + 10_000 * 5e-5))
    assert row["sequential"]["table1_gpu_hours_low"] == pytest.approx((large56 + pruned56 + vgg) / 3600)
    assert row["sequential"]["table1_gpu_hours_high"] == pytest.approx((large56 + 2 * pruned56 + vgg) / 3600)
    assert row["concurrent"]["table1_gpu_hours_low"] == pytest.approx(row["sequential"]["table1_gpu_hours_low"] / 2)
    assert gpu_train.resnet56_epochs(stages, ref) == pytest.approx(160 + 110 + 480)


@pytest.mark.slow
def test_gpu_train_smoke_runs_every_piece_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("\n{\n") + 1:])
    for model in gpu_train.MODELS:
        assert set(result["per_step"][model]) == set(gpu_train.VARIANTS)
        assert all(m["train_s"] > 0 and m["eval_s"] > 0 for m in result["per_step"][model].values())
        assert set(result["concurrent"][model]) == {"1", "2"}
    # Table 1: 5 seeds x (VGG-16: large + A's test, fine-tune, Scratch-E, Scratch-B; ResNet-56 and -110: large +
    # the same four for A and B); Scratch-B's epochs as the paper's (docs/paper-settings.md §1.3)
    assert result["table1"]["stages"] == 5 * (5 + 9 + 9)
    assert result["table1"]["scratch_b_epochs"]["l1_vgg16 A"] == 243
    assert result["table1"]["scratch_b_epochs"]["l1_resnet56 B"] == 220
    assert set(result["projection"]) == set(gpu_train.VARIANTS)
    assert "projection: per image" in proc.stdout
