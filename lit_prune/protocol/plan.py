"""Planning: the stages of an experiment, their commands and epochs, and Scratch-B's budget.

For every seed: the large model, then per variant its prune stage, the pruned model's test (no
retraining) and one stage per regime. A stage's epochs are those of its resolved train.py config
(:meth:`ExperimentConfig.resolve`); a compute-budget regime (Scratch-B) gets its epochs and milestones
once the variant's artifact exists, from its FLOPs ratio (:meth:`Planner.scratch_b`): the ratio the
artifact stores (MACs, ``convention: macs``), or with ``convention: reference`` the ratio of the paper's
reference counters (docs/paper-settings.md §1.3-1.4), recounted on the artifact's model and on the dense model rebuilt
from the artifact's architecture.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_prune.protocol.config import ExperimentConfig, ExperimentError, RegimeConfig, VariantConfig
from lit_prune.protocol.layout import ARTIFACT, LARGE, PRUNE, RunLayout, read_metrics

if TYPE_CHECKING:  # torch: only when a run looks at its files
    from lit_prune.artifact import Artifact


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
    convention: str = "macs"  # the FLOPs convention the ratio was counted in
    fallback: str = ""  # why the reference convention could not be used (the stored MACs ratio was)

    @property
    def note(self) -> str:
        note = f"r = {self.ratio:.3f}" + (" (reference FLOPs)" if self.convention == "reference" else "")
        note += f", capped at {self.factor:g}" if self.factor < self.ratio else ""
        return note + (f"; {self.fallback}" if self.fallback else "")

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
        # the stage logs its hyper-parameters once, with the final accuracy as hp_metric (protocol/stage.py)
        return {"trainer": {"logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                       "init_args": {"save_dir": str(self.layout.tb), "name": f"seed{st.seed}",
                                                     "version": self.layout.tb_version(st.variant, st.kind),
                                                     "default_hp_metric": False}}}}

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
        if not v.fresh:  # a predefined (uniform, guided) architecture has no pruned weights to test
            pruned = Stage(seed, v.name, "pruned", self.layout.stage_dir(seed, v.name, "pruned"), epochs=0)
            stages.append(replace(pruned, command=self.stage_command(
                pruned, [*art, "--model.regime=finetune", "--trainer.max_epochs=0"])))
        for key in self.config.regimes_of(v):
            stages.append(self._regime(seed, v, key, self.config.regimes[key], art))
        return stages

    def _source(self, seed: int, v: VariantConfig) -> list[str]:
        """The model variant ``v`` prunes: the large model, or the retrained model of its source variant."""
        if v.source:  # iterative pruning: prune the retrained model of an earlier variant
            return [f"--checkpoint={self.layout.model(seed, v.source.variant, v.source.regime)}"]
        if self.config.large.weights:
            return [f"--arch={self.config.large.arch}", f"--weights={self.config.large.weights}"]
        return [f"--checkpoint={self.large_checkpoint(seed)}"]

    def _prune(self, seed: int, v: VariantConfig, artifact: Path) -> Stage:
        st = Stage(seed, v.name, PRUNE, self.layout.stage_dir(seed, v.name, PRUNE))
        if v.from_training:
            return replace(st, note=f"artifact {v.from_training} written by the large run's callback")
        if v.width_config:  # a predefined architecture: nothing is pruned, only built
            return replace(st, command=[self.python, "-m", "lit_prune.prune", f"--arch={v.arch or self.large.arch}",
                                        f"--width-config={v.width_config}", f"--out={artifact}"])
        if v.uniform or v.random or v.guided:
            return replace(st, command=self._search_command(seed, v, artifact))
        extra = [f"--method-args={json.dumps(dict(v.method_args), sort_keys=True)}"] if v.method_args else []
        # data-driven methods (ThiNet, channel pruning) sample the base config's training data
        return replace(st, command=[self.python, "-m", "lit_prune.prune", *self._source(seed, v),
                                    f"--config={v.method}", *extra, f"--data-config={self.config.base}",
                                    f"--out={artifact}",
                                    f"--log-dir={self.layout.tb_run(seed, v.name, PRUNE)}"])

    def _search_command(self, seed: int, v: VariantConfig, artifact: Path) -> list[str]:
        """``python -m lit_prune.search``: a uniform baseline, a random control or a guided architecture."""
        cmd = [self.python, "-m", "lit_prune.search"]
        if v.uniform or v.random:
            ref = v.uniform or v.random
            of = self.config.variant(ref.of)
            cmd += ["uniform" if v.uniform else "random", f"--of={self.layout.artifact(seed, of.name)}",
                    *self._source(seed, of)]
            if v.uniform:
                cmd.append(f"--match={v.uniform.match}")
                if of.method:  # its width plan's skip list is honoured
                    cmd.append(f"--method-config={of.method}")
                    if of.method_args:
                        cmd.append(f"--method-args={json.dumps(dict(of.method_args), sort_keys=True)}")
        else:
            assert v.guided is not None
            if v.guided.source_dir:
                sources = [f"--from-dir={v.guided.source_dir}", f"--from-variant={v.guided.variant}"]
            else:
                sources = [f"--of={self.layout.artifact(seed, o)}" for o in v.guided.of]
            # the new architecture: this experiment's large model (or another zoo model of its classes)
            cmd += ["guided", *sources, *self._source(seed, v), *([f"--target-arch={v.arch}"] if v.arch else [])]
        return [*cmd, f"--seed={seed}", f"--out={artifact}"]

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
        path = self.layout.artifact(st.seed, st.variant)
        art = load_artifact(path)
        regime = self.config.regimes[st.kind]
        ratio, convention, fallback = art.flops.ratio, "macs", ""
        if regime.convention == "reference":
            try:
                ratio, convention = reference_ratio(art, self.large_cfg(), self.large.arch), "reference"
            except _NoReference as why:
                fallback = f"reference FLOPs unavailable ({why}), using the artifact's MACs ratio"
                print(f"note: {st.label}: {fallback}", file=sys.stderr, flush=True)
        try:
            budget = scratch_b_budget(self.epochs, ratio, rule=regime.rule, cap=regime.cap,
                                      base_milestones=self.large.milestones)
        except ValueError as err:
            raise ExperimentError(f"regime {st.kind!r}: {err}") from None
        return ScratchB(budget.epochs, list(budget.milestones), budget.ratio, budget.factor,
                        [f"--trainer.max_epochs={budget.epochs}", "--model.schedule=multistep",
                         f"--model.milestones={json.dumps(budget.milestones)}"], convention, fallback)

    def large_cfg(self) -> Any:
        """The width config the base config gives the large model (``model.cfg``; None: the unpruned one)."""
        model = self.config.docs[self.config.base].get("model")
        return model.get("cfg") if isinstance(model, dict) else None


class _NoReference(Exception):
    """Why the dense model of an artifact cannot be rebuilt for the reference count."""


def reference_ratio(art: Artifact, large_cfg: Any = None, large_arch: str | None = None) -> float:
    """Scratch-B's r in the reference convention (docs/paper-settings.md §1.3-1.4): ``FLOPs(large) / FLOPs(pruned)``
    with ``count_flops(..., convention="reference")``, the pruned model after its masks (non-zero conv
    weights where the artifact has masks, as the paper intends; docs/paper-settings.md §12.2).

    The artifact stores the large model's counts as MACs only, so the large model is rebuilt: the
    artifact's architecture name and its non-width kwargs (num_classes, depth, ...), with the large model's
    ``cfg`` or the unpruned widths; where that is not the large model, ``large_arch`` (the large model's
    zoo name, e.g. VGG-16 beside a ThiNet-GAP variant) with the artifact's ``num_classes``. The first
    rebuilt model with the MACs the artifact recorded for its large model is the large model.

    Raises:
        _NoReference: the large model cannot be rebuilt (another architecture, other widths).
    """
    import torch

    from lit_prune.artifact import build_model
    from lit_prune.core.flops import count_flops
    from lit_prune.models import create_model

    arch = art.architecture
    size = art.input_size
    pruned = build_model(art)
    widths = set(pruned.arch_kwargs())  # cfg, select: what pruning changed
    own = {k: v for k, v in arch.kwargs.items() if k not in widths}
    candidates = [(arch.name, own)]
    if large_arch and large_arch != arch.name:
        candidates.append((large_arch, {k: v for k, v in own.items() if k == "num_classes"}))
    if large_cfg is not None:  # the large model's widths first, then the unpruned ones
        candidates = [c for name, kw in candidates for c in ((name, {**kw, "cfg": large_cfg}), (name, kw))]
    stored, problems = art.flops.dense.macs, []
    for name, kwargs in candidates:
        try:
            with torch.device("meta"):  # shapes are all a dense count needs
                dense_count = count_flops(create_model(name, **kwargs), size, convention="reference")
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"cannot rebuild a large {name} ({err})")
            continue
        if dense_count.macs == stored:
            break
        problems.append(f"a rebuilt large {name} has {dense_count.macs} MACs, the artifact recorded {stored}")
    else:
        raise _NoReference("; ".join(problems))
    with_masks = bool(art.masks)
    return dense_count.flops / max(count_flops(pruned, size, nonzero=with_masks, convention="reference").flops, 1)
