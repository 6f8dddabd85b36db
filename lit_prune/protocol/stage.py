"""One stage of a protocol: fit (resuming from its own last checkpoint), test the final-epoch model,
record the metrics and export the trained model as an artifact.

    python -m lit_prune.stage --stage_dir runs/exp/seed0/B/scratch_b --config configs/cifar/l1_resnet56.yaml \\
        --model.artifact runs/exp/seed0/B/prune/pruned.pt --model.regime scratch --trainer.max_epochs 220

Arguments other than ``--stage_dir`` and ``--weights`` (a Lightning checkpoint or a plain, e.g.
torchvision, state dict loaded into the model before anything runs) are ``train.py fit``
arguments. The stage is done when
``<stage_dir>/metrics.json`` exists; a killed stage started again resumes from
``<stage_dir>/checkpoints/last.ckpt``. ``--trainer.max_epochs 0`` only tests (the pruned model before
retraining). Lightning's DDP launcher re-executes this module on every rank, so it runs under any strategy.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lit_prune.artifact import make_artifact, read_weights, save_artifact
from lit_prune.cli.train import LitPruneCLI
from lit_prune.core.protocols import is_zoo_model
from lit_prune.io import atomic_save_json
from lit_prune.models import architecture
from lit_prune.module import ImageClassifier
from lit_prune.protocol.layout import METRICS, MODEL, RunLayout


class StageTimer(pl.Callback):
    """Training wall time, carried through checkpoints so that a resumed stage reports its whole time."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._start: float | None = None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def total(self) -> float:
        return self.elapsed + (time.perf_counter() - self._start if self._start is not None else 0.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.total()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed = float(state_dict.get("elapsed", 0.0))


def _pop(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag:
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def run_stage(argv: list[str]) -> dict[str, Any]:
    argv = list(argv)
    stage_dir = _pop(argv, "--stage_dir")
    if stage_dir is None:
        raise SystemExit("lit_prune.stage needs --stage_dir DIR")
    weights = _pop(argv, "--weights")
    stage = Path(stage_dir)
    ckpt_dir = stage / "checkpoints"
    # No "last-v1.ckpt": a restart whose checkpoint state does not name this directory (the experiment was
    # moved) would otherwise write there, leaving a stale last.ckpt for the next resume and for pruning.
    argv = ["--checkpoint.enable_version_counter=false", *argv,
            f"--checkpoint.dirpath={ckpt_dir}", f"--trainer.default_root_dir={stage}"]
    with warnings.catch_warnings():
        # sys.argv must keep the stage's arguments (DDP re-launches it for the other ranks), so LightningCLI
        # sees both; its warning about that is noise in every stage.log
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = LitPruneCLI(ImageClassifier, pl.LightningDataModule, subclass_mode_data=True, args=argv, run=False,
                          save_config_kwargs={"overwrite": True})
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    # Lightning would log the constructor's hyper-parameters at fit start (the base config's widths, not the
    # artifact's; hp_metric -1); the stage logs them once, at the end, with what it measured.
    model._log_hyperparams = False
    if data is not None:
        data._log_hyperparams = False
    if weights is not None:
        load_weights_into(model, weights)
    timer = StageTimer()
    trainer.callbacks.append(timer)
    last = ckpt_dir / "last.ckpt"
    if trainer.max_epochs:
        if last.is_file():
            rank_zero_info(f"resuming {stage} from {last}")
        trainer.fit(model, data, ckpt_path=str(last) if last.is_file() else None)
    results = trainer.test(model, data, verbose=False)[0]
    metrics = {
        "acc1": float(results["test/acc1"]),
        "acc5": float(results.get("test/acc5", results["test/acc1"])),
        "loss": float(results["test/loss"]),
        "epochs": int(trainer.current_epoch),
        "max_epochs": int(trainer.max_epochs or 0),
        "milestones": list(model.hparams.milestones) if model.hparams.milestones else None,
        "regime": model.hparams.regime,
        "artifact": model.hparams.artifact,
        "wall_time_s": timer.total(),
        "world_size": trainer.world_size,
    }
    if trainer.is_global_zero:
        art = None
        try:  # any model the stage could build: a zoo model, or one rebuilt from its builder and edits
            art = make_artifact(model.model, method=f"retrain:{model.hparams.regime}", masks=model.masks,
                                source=str(stage), settings={"max_epochs": metrics["max_epochs"]},
                                init_state=model.init_state)
        except ValueError as err:  # a network handed over in Python that no file can rebuild
            warnings.warn(f"{stage}: the trained model is not written as {MODEL}: {err}", stacklevel=1)
        else:
            metrics.update(macs=art.flops.pruned.macs, params=art.flops.pruned.params)
            save_artifact(art, stage / MODEL)
        _log_hyperparameters(trainer, model, stage, metrics, art.architecture.name if art is not None else None)
        atomic_save_json(metrics, stage / METRICS)
    trainer.strategy.barrier("lit_prune_stage")
    return metrics


def _log_hyperparameters(trainer: pl.Trainer, model: ImageClassifier, stage: Path, metrics: dict[str, Any],
                         arch_name: str | None) -> None:
    """The stage's hyper-parameters in its TensorBoard run (the HParams tab), with the test accuracy as hp_metric:
    seed, variant and regime (scratch_e and scratch_b apart) from the stage folder, the widths of the network
    actually trained, and where it came from."""
    if trainer.logger is None:
        return
    try:
        seed, variant, kind = RunLayout.describe(stage)
    except ValueError:  # a stage run by hand outside an experiment directory
        seed, variant, kind = None, None, stage.name
    if is_zoo_model(model.model):
        arch = architecture(model.model)
    else:  # its builder's name (torchvision:resnet50), whose widths the edits describe
        arch = {"name": arch_name or type(model.model).__name__, "kwargs": {}}
    params = {
        "seed": seed, "variant": variant or "unpruned", "regime": kind, "start": model.hparams.regime,
        "method": model.source_method or "none", "arch": arch["name"],
        "widths": json.dumps(arch["kwargs"].get("cfg")), "lr": model.hparams.lr, "max_epochs": metrics["max_epochs"],
        "macs": metrics.get("macs"), "params": metrics.get("params"),
    }
    trainer.logger.log_hyperparams({k: v for k, v in params.items() if v is not None},
                                   metrics={"hp_metric": metrics["acc1"]})


def load_weights_into(module: ImageClassifier, path: str) -> None:
    """Load a Lightning checkpoint's or a plain state dict's weights into ``module.model`` (strict)."""
    try:
        module.model.load_state_dict(read_weights(path))
    except RuntimeError as err:
        raise SystemExit(f"{path} does not match the configured model: {err}") from None


def main() -> None:
    metrics = run_stage(sys.argv[1:])
    rank_zero_info(f"stage done: test acc1 {100 * metrics['acc1']:.2f}%")


if __name__ == "__main__":
    main()
