"""Planning: the stages of an experiment, their commands and epochs, and Scratch-B's budget.

For every seed: the large model, then per variant its prune stage, the pruned model's test (no
retraining) and one stage per regime. A stage's epochs are those of its resolved train.py config
(:meth:`ExperimentConfig.resolve`); a compute-budget regime (Scratch-B) gets its epochs and milestones
once the variant's artifact exists, from its FLOPs ratio (:meth:`Planner.scratch_b`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lit_prune.protocol.config import ExperimentConfig, ExperimentError, RegimeConfig, VariantConfig
from lit_prune.protocol.layout import ARTIFACT, LARGE, PRUNE, RunLayout, read_metrics


@dataclass(frozen=True)
class Stage:
    """One step of the protocol and how to tell that it is done."""

    seed: int
    variant: str | None
    kind: str  # "large", "prune", "pruned" (test only) or a regime
    dir: Path
    command: list[str] = field(default_factory=list)
    epochs: int | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return f"seed {self.seed} | " + (f"{self.variant} | " if self.variant else "") + self.kind

    def done(self) -> bool:
        if self.kind == PRUNE:
            from lit_prune.artifact import load_artifact  # torch: only when a run looks at its files

            try:
                load_artifact(self.dir / ARTIFACT)
                return True
            except (FileNotFoundError, ValueError):
                return False
        return read_metrics(self.dir) is not None


@dataclass(frozen=True)
class ScratchB:
    """A compute-budget stage's epochs and LR milestones, from the FLOPs ratio ``ratio`` of its artifact."""

    epochs: int
    milestones: list[int]
    ratio: float
    factor: float  # the ratio, or the cap where it applies
    args: list[str]  # appended to the stage's command

    @property
    def note(self) -> str:
        return f"r = {self.ratio:.3f}" + (f", capped at {self.factor:g}" if self.factor < self.ratio else "")

    def applied_to(self, st: Stage) -> Stage:
        """The stage with this budget (a new Stage; ``st`` is left as it is)."""
        return replace(st, command=[*st.command, *self.args], epochs=self.epochs, note=self.note)


class Planner:
    """The stages of ``config`` in the experiment directory ``layout``, run with the interpreter ``python``."""

    def __init__(self, config: ExperimentConfig, layout: RunLayout, python: str = sys.executable) -> None:
        self.config, self.layout, self.python = config, layout, python
        # the large model's resolved config: its epochs and milestones are what Scratch-B stretches
        self.large = config.resolve([*config.args, *config.large.args])
        self.epochs = int(self.large.max_epochs or 0)

    # -- commands
    def stage_command(self, st: Stage, extra: list[str]) -> list[str]:
        return [self.python, "-m", "lit_prune.stage", f"--stage_dir={st.dir}", f"--config={self.config.base}",
                f"--config={self.layout.stage_yaml(st.dir)}", f"--seed_everything={st.seed}", *self.config.args,
                *extra]

    def stage_yaml(self, st: Stage) -> dict[str, Any]:
        """The stage's own config (written beside it before it runs): its TensorBoard run."""
        return {"trainer": {"logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                       "init_args": {"save_dir": str(self.layout.tb),
                                                     "name": self.layout.tb_name(st.variant, st.kind),
                                                     "version": f"seed{st.seed}"}}}}

    def large_checkpoint(self, seed: int) -> str:
        return self.config.large.checkpoint or str(self.layout.large_checkpoint(seed))

    def _epochs(self, st: Stage, extra: list[str]) -> int:
        epochs = self.config.resolve([*self.config.args, *extra]).max_epochs
        if epochs is None:
            raise ExperimentError(f"stage '{st.label}' sets no trainer.max_epochs (neither {self.config.base}, nor "
                                  "the config files and flags of its args)")
        return epochs

    # -- stages
    def stages(self) -> list[Stage]:
        stages: list[Stage] = []
        for seed in self.config.seeds:
            stages.append(self._large(seed))
            for v in self.config.variants:
                stages += self._variant(seed, v)
        return stages

    def _large(self, seed: int) -> Stage:
        large = self.config.large
        st = Stage(seed, None, LARGE, self.layout.large_dir(seed), epochs=self.epochs)
        if large.given:
            return replace(st, command=self.stage_command(st, ["--trainer.max_epochs=0", f"--weights={large.given}"]),
                           epochs=0, note=f"testing the given large model {large.given}")
        return replace(st, command=self.stage_command(st, list(large.args)))

    def _variant(self, seed: int, v: VariantConfig) -> list[Stage]:
        artifact = self.layout.artifact(seed, v.name)
        stages = [self._prune(seed, v, artifact)]
        art = [f"--model.artifact={artifact}"]
        if v.arch:  # another model than the base config's (ThiNet-GAP next to VGG-16)
            art.append(f"--model.arch={v.arch}")
        if not v.width_config:  # a predefined architecture has no pruned weights to test
            pruned = Stage(seed, v.name, "pruned", self.layout.stage_dir(seed, v.name, "pruned"), epochs=0)
            stages.append(replace(pruned, command=self.stage_command(
                pruned, [*art, "--model.regime=finetune", "--trainer.max_epochs=0"])))
        for key, regime in self.config.regimes.items():
            stages.append(self._regime(seed, v, key, regime, art))
        return stages

    def _prune(self, seed: int, v: VariantConfig, artifact: Path) -> Stage:
        st = Stage(seed, v.name, PRUNE, self.layout.stage_dir(seed, v.name, PRUNE))
        if v.from_training:
            return replace(st, note=f"artifact {v.from_training} written by the large run's callback")
        if v.width_config:  # a predefined architecture: nothing is pruned, only built
            return replace(st, command=[self.python, "-m", "lit_prune.prune", f"--arch={v.arch or self.large.arch}",
                                        f"--width-config={v.width_config}", f"--out={artifact}"])
        if v.source:  # iterative pruning: prune the retrained model of an earlier variant
            source = [f"--checkpoint={self.layout.model(seed, v.source.variant, v.source.regime)}"]
        elif self.config.large.weights:
            source = [f"--arch={self.config.large.arch}", f"--weights={self.config.large.weights}"]
        else:
            source = [f"--checkpoint={self.large_checkpoint(seed)}"]
        # data-driven methods (ThiNet, channel pruning) sample the base config's training data
        return replace(st, command=[self.python, "-m", "lit_prune.prune", *source, f"--config={v.method}",
                                    f"--data-config={self.config.base}", f"--out={artifact}"])

    def _regime(self, seed: int, v: VariantConfig, key: str, regime: RegimeConfig, art: list[str]) -> Stage:
        st = Stage(seed, v.name, key, self.layout.stage_dir(seed, v.name, key))
        extra = [*art, f"--model.regime={regime.regime}", *regime.args]
        return replace(st, command=self.stage_command(st, extra), epochs=self._epochs(st, extra))

    # -- Scratch-B
    def needs_budget(self, st: Stage) -> bool:
        regime = self.config.regimes.get(st.kind)
        return st.variant is not None and regime is not None and regime.compute

    def budget_known(self, st: Stage) -> bool:
        return st.variant is not None and self.layout.artifact(st.seed, st.variant).is_file()

    def pending_note(self) -> str:
        """What a dry run says of a Scratch-B stage whose artifact does not exist yet."""
        return f"epochs = int({self.epochs} * r), r = FLOPs ratio measured after pruning"

    def scratch_b(self, st: Stage) -> ScratchB:
        """Scratch-B's epochs and milestones from the FLOPs ratio of the artifact (known after pruning)."""
        from lit_prune.artifact import load_artifact
        from lit_prune.core.budget import scratch_b_budget

        assert st.variant is not None, st
        art = load_artifact(self.layout.artifact(st.seed, st.variant))
        regime = self.config.regimes[st.kind]
        try:
            budget = scratch_b_budget(self.epochs, art["flops"]["ratio"], rule=regime.rule, cap=regime.cap,
                                      base_milestones=self.large.milestones)
        except ValueError as err:
            raise ExperimentError(f"regime {st.kind!r}: {err}") from None
        return ScratchB(budget.epochs, list(budget.milestones), budget.ratio, budget.factor,
                        [f"--trainer.max_epochs={budget.epochs}", "--model.schedule=multistep",
                         f"--model.milestones={json.dumps(budget.milestones)}"])
