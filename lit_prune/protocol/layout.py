"""Every path of an experiment directory, in one place.

    <out>/experiment.json                 the config it belongs to (name, hash, normalised config)
    <out>/.lock                           held by the runner while it runs (flock; records host, pid, start)
    <out>/seed<N>/large/                  the large model's stage (checkpoints/last.ckpt, metrics.json, model.pt)
    <out>/seed<N>/<variant>/prune/        pruned.pt, the variant's artifact
    <out>/seed<N>/<variant>/pruned/       the pruned model tested before retraining
    <out>/seed<N>/<variant>/<regime>/     one retraining (metrics.json, model.pt, checkpoints/, stage.log)
    <stage dir>/.lock                     held while the stage runs, by the runner and the stage's process
    <out>/tb/<large | variant/stage>/seed<N>/   TensorBoard runs
    <out>/results.md, results.json, results.png

The layout is the on-disk contract of a resumable run: a directory written by an earlier version resumes
as long as these names stay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "experiment.json"
METRICS = "metrics.json"  # written by lit_prune.stage when a stage is done
ARTIFACT = "pruned.pt"  # a variant's pruned model, in its prune/ directory
MODEL = "model.pt"  # a stage's trained model, as an artifact
LOCK = ".lock"  # the experiment's and each stage's lock file (lit_prune.protocol.lock)
LARGE = "large"
PRUNE = "prune"


class RunLayout:
    """The paths of the experiment directory ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    # -- the experiment
    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_png(self) -> Path:
        return self.root / "results.png"

    # -- stages
    def seed_dir(self, seed: int) -> Path:
        return self.root / f"seed{seed}"

    def stage_dir(self, seed: int, variant: str | None, kind: str) -> Path:
        """``large`` (no variant), a variant's ``prune`` and ``pruned`` stages, or one of its regimes."""
        if variant is None:
            return self.seed_dir(seed) / kind
        return self.seed_dir(seed) / variant / kind

    def large_dir(self, seed: int) -> Path:
        return self.stage_dir(seed, None, LARGE)

    def large_checkpoint(self, seed: int) -> Path:
        return self.large_dir(seed) / "checkpoints" / "last.ckpt"

    def artifact(self, seed: int, variant: str) -> Path:
        return self.stage_dir(seed, variant, PRUNE) / ARTIFACT

    def model(self, seed: int, variant: str | None, kind: str) -> Path:
        return self.stage_dir(seed, variant, kind) / MODEL

    def row_dir(self, seed: int, variant: str, row: str) -> Path:
        """The stage behind a row of the results table (``unpruned`` is the large model)."""
        return self.large_dir(seed) if row == "unpruned" else self.stage_dir(seed, variant, row)

    def tb_version(self, variant: str | None, kind: str) -> str:
        """A stage's TensorBoard run inside its seed: named as its folder (``large``, ``B/scratch_b``)."""
        return kind if variant is None else f"{variant}/{kind}"

    def tb_run(self, seed: int, variant: str | None, kind: str) -> Path:
        """``tb/seed<N>/large``, ``tb/seed<N>/<variant>/<regime>``: the runs nest as the stage folders do."""
        return self.tb / f"seed{seed}" / self.tb_version(variant, kind)

    def artifacts(self, variant: str) -> list[Path]:
        """Every seed's artifact of ``variant`` in this (finished) experiment directory, by seed.

        Raises:
            FileNotFoundError: none (the message names the directory and the variants it has).
        """
        found = sorted(self.root.glob(f"seed*/{variant}/{PRUNE}/{ARTIFACT}"),
                       key=lambda p: self.describe(p.parent)[0])
        if not found:
            have = sorted({p.parent.parent.name for p in self.root.glob(f"seed*/*/{PRUNE}/{ARTIFACT}")})
            raise FileNotFoundError(f"no artifact of variant {variant!r} in {self.root} (its variants: {have})")
        return found

    @staticmethod
    def large_model_of(artifact: Path) -> Path | None:
        """The trained large model (``seed<N>/large/model.pt``) of the seed a variant's artifact belongs to, or None
        for a file outside an experiment directory."""
        try:
            seed, variant, _ = RunLayout.describe(Path(artifact).parent)
        except ValueError:
            return None
        if variant is None:
            return None
        return Path(artifact).parents[3] / f"seed{seed}" / LARGE / MODEL

    @staticmethod
    def describe(stage_dir: Path) -> tuple[int, str | None, str]:
        """``(seed, variant, kind)`` of a stage folder, from its last parts (the inverse of :meth:`stage_dir`).

        Raises:
            ValueError: ``stage_dir`` does not end in ``seed<N>/<stage>`` or ``seed<N>/<variant>/<stage>``.
        """
        parts = Path(stage_dir).parts
        for depth, variant in ((2, None), (3, parts[-2] if len(parts) >= 3 else None)):
            if len(parts) >= depth and parts[-depth].startswith("seed") and parts[-depth][4:].lstrip("-").isdigit():
                return int(parts[-depth][4:]), variant, parts[-1]
        raise ValueError(f"{stage_dir} is not a stage folder (seed<N>/[<variant>/]<stage>)")

    def training_artifact_places(self, seed: int) -> list[Path]:
        """Where the large run's callbacks write their files: the trainer's log directory (the large stage's
        TensorBoard run; ``tb/large/seed<N>`` in runs made before the runs were named as the folders), or the
        stage directory without a logger."""
        return [self.tb_run(seed, None, LARGE), self.tb / LARGE / f"seed{seed}", self.large_dir(seed)]

    @staticmethod
    def stage_yaml(stage_dir: Path) -> Path:
        return stage_dir / "stage.yaml"

    @staticmethod
    def stage_log(stage_dir: Path) -> Path:
        return stage_dir / "stage.log"

    @staticmethod
    def stage_lock(stage_dir: Path) -> Path:
        return stage_dir / LOCK


def read_metrics(stage_dir: Path) -> dict[str, Any] | None:
    """A finished stage's metrics, or None (not run, or its write was cut short)."""
    try:
        m = json.loads((stage_dir / METRICS).read_text())
        return m if isinstance(m, dict) and "acc1" in m else None
    except (OSError, ValueError):
        return None
