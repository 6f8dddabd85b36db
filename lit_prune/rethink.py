"""The protocol runner: one command runs a whole experiment of the paper.

    python -m lit_prune.rethink --config configs/experiments/quickstart.yaml
    python -m lit_prune.rethink --config configs/experiments/l1_resnet56.yaml --out runs/r56 --dry-run

For every seed: train the large model (with the method's callback where it needs one, e.g. slimming's
sparsity), prune it to an artifact per variant, test the pruned model before retraining, then fine-tune,
Scratch-E and Scratch-B it. Every training stage is its own ``python -m lit_prune.stage`` process (so it
runs under any strategy, DDP included: Lightning's launcher re-executes the stage on each rank). The
results land in ``results.md``, ``results.json`` and ``results.png`` of the experiment directory, and
TensorBoard runs in ``<out>/tb`` (one run per variant, stage and seed).

The runner is resumable: a stage is done when its ``metrics.json`` (or its artifact) exists and reads
back; a killed stage restarts from its last checkpoint. An experiment directory belongs to one config
(its hash is kept in ``experiment.json``); another config is refused rather than mixed in.

Experiment config (YAML)::

    name: l1_resnet56
    base: configs/cifar/l1_resnet56.yaml   # train.py config of the large model and of every retraining
    seeds: [0, 1, 2, 3, 4]
    args: []                               # train.py arguments for every stage (devices, strategy, ...)
    large:
      args: []                             # extra arguments of the large model only (e.g. a --config of a callback)
      checkpoint: null                     # start from this large model (Lightning checkpoint) instead
      arch: null                           # ... or from torchvision-format weights of this zoo model
      weights: null
    variants:
      - name: B
        method: configs/methods/l1_resnet56_b.yaml      # one-shot pruning of the large model's last checkpoint
        # or   from_training: sfp-masked.pt            the artifact file its training callback wrote (SFP)
        # or   width_config: thinet70                  a predefined architecture of the base model (Scratch only;
        #      arch: vgg16_gap                         optionally of another zoo model)
        # with source: {variant: A, regime: rewind}    prune an earlier variant's retrained model (lottery rounds)
    regimes:                               # any subset; arguments are appended to the stage's command
      finetune: {args: [--model.lr=0.001, --model.schedule=constant, --trainer.max_epochs=40]}
      scratch_e: {args: []}
      scratch_b: {rule: fractions, cap: null, args: []}    # rules: fractions, thirds, scale, multiples
      # more regimes: NAME: {regime: finetune | scratch | rewind, budget: same | compute, args: [...]}
    paper:                                 # optional: numbers printed beside ours, per variant
      B: {unpruned: "93.14 +-0.12 [RW]", scratch_b: "93.05 +-0.18 [RW]"}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_prune.artifact import atomic_save_json, load_artifact
from lit_prune.core.budget import RULES, scratch_b_budget

REGIMES = ("finetune", "scratch_e", "scratch_b")  # the paper's three; configs may name more (lottery arms)
# How each regime starts from the artifact (ImageClassifier's regime) and which budget it trains for.
DEFAULTS = {"finetune": {"regime": "finetune", "budget": "same"},
            "scratch_e": {"regime": "scratch", "budget": "same"},
            "scratch_b": {"regime": "scratch", "budget": "compute"}}
LABELS = {"unpruned": "Unpruned", "pruned": "Pruned (no retraining)", "finetune": "Fine-tuned",
          "scratch_e": "Scratch-E", "scratch_b": "Scratch-B"}
_TOP_KEYS = {"name", "base", "seeds", "args", "large", "variants", "regimes", "paper", "out"}


class ExperimentError(ValueError):
    """A problem with the experiment's config or directory, worded for the user."""


# ---- config -----------------------------------------------------------------------------------------
def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read and validate an experiment config; relative paths in it are relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"no experiment config at {path}")
    exp = yaml.safe_load(path.read_text()) or {}
    unknown = set(exp) - _TOP_KEYS
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    for key in ("name", "base", "variants"):
        if not exp.get(key):
            raise ExperimentError(f"{path}: '{key}' is required (see python -m lit_prune.rethink --help)")
    if not Path(exp["base"]).is_file():
        raise ExperimentError(f"{path}: base config {exp['base']} does not exist")
    exp.setdefault("seeds", [0])
    exp.setdefault("args", [])
    exp.setdefault("large", {})
    exp.setdefault("paper", {})
    exp.setdefault("regimes", {r: {} for r in REGIMES})
    regimes = {}
    for key, cfg in exp["regimes"].items():
        cfg = {**DEFAULTS.get(key, {}), **(cfg or {})}
        if cfg.get("regime") not in ("finetune", "scratch", "rewind"):
            raise ExperimentError(f"{path}: regime {key!r} needs 'regime: finetune | scratch | rewind' (the "
                                  f"paper's {', '.join(REGIMES)} have it by default)")
        if cfg.get("budget", "same") not in ("same", "compute"):
            raise ExperimentError(f"{path}: regime {key!r}: budget must be 'same' (Scratch-E) or 'compute' "
                                  f"(Scratch-B), got {cfg['budget']!r}")
        if cfg.get("cap") is not None and float(cfg["cap"]) < 1:
            raise ExperimentError(f"{path}: regime {key!r}: the Scratch-B cap must be >= 1 (the paper uses 2.0 on "
                                  f"ImageNet), got {cfg['cap']}")
        if cfg.get("rule", "fractions") not in RULES:
            raise ExperimentError(f"{path}: regime {key!r}: rule must be one of {', '.join(RULES)}, "
                                  f"got {cfg.get('rule')!r}")
        regimes[key] = cfg
    exp["regimes"] = regimes
    for v in exp["variants"]:  # `name: 70` is an int in YAML; names become paths and table headings
        if v.get("name") is not None:
            v["name"] = str(v["name"])
    exp["paper"] = {str(k): v for k, v in exp["paper"].items()}
    names = [v.get("name") for v in exp["variants"]]
    if len(set(names)) != len(names) or not all(names):
        raise ExperimentError(f"{path}: every variant needs a unique name, got {names}")
    for i, v in enumerate(exp["variants"]):
        src = v.get("source")
        if src is not None:
            earlier = [w["name"] for w in exp["variants"][:i]]
            if src.get("variant") not in earlier or src.get("regime") not in regimes:
                raise ExperimentError(f"{path}: variant {v['name']!r}: source must name an earlier variant "
                                      f"({earlier}) and a regime ({list(regimes)}), got {src}")
        if sum(bool(v.get(k)) for k in ("method", "from_training", "width_config")) != 1:
            raise ExperimentError(f"{path}: variant {v['name']!r} needs one of 'method' (a method config), "
                                  "'from_training' (an artifact its large run writes) or 'width_config' (a predefined "
                                  "architecture of the base model)")
        if v.get("width_config") and "finetune" in regimes:
            raise ExperimentError(f"{path}: variant {v['name']!r} is a predefined architecture without trained "
                                  "weights: drop the finetune regime (the paper's Fine-tuned column came from the "
                                  "original authors' released models)")
        if v.get("method") and not Path(v["method"]).is_file():
            raise ExperimentError(f"{path}: variant {v['name']!r}: method config {v['method']} does not exist")
    ck = exp["large"].get("checkpoint")
    if ck and not Path(ck).is_file():
        raise ExperimentError(f"{path}: large.checkpoint {ck} does not exist")
    return exp


def config_hash(exp: dict[str, Any]) -> str:
    """Hash of everything that decides the results (the config and the files it names)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in exp.items() if k not in ("paper", "out")}, sort_keys=True,
                                  default=str).encode())
    files = [exp["base"]] + [v["method"] for v in exp["variants"] if v.get("method")]
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def _last_value(args: list[str], flag: str) -> str | None:
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def base_epochs(exp: dict[str, Any]) -> int:
    """The large model's epochs: the base config's trainer.max_epochs unless the arguments override it."""
    doc = yaml.safe_load(Path(exp["base"]).read_text()) or {}
    value = _last_value(list(exp["args"]) + list(exp["large"].get("args", [])), "--trainer.max_epochs")
    epochs = int(value) if value is not None else (doc.get("trainer") or {}).get("max_epochs")
    if not epochs:
        raise ExperimentError(f"{exp['base']} sets no trainer.max_epochs; Scratch-E/B need the large model's epochs")
    return int(epochs)


def base_milestones(exp: dict[str, Any]) -> list[int] | None:
    doc = yaml.safe_load(Path(exp["base"]).read_text()) or {}
    return (doc.get("model") or {}).get("milestones")


# ---- stages -----------------------------------------------------------------------------------------
@dataclass
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
        if self.kind == "prune":
            try:
                load_artifact(self.dir / "pruned.pt")
                return True
            except (FileNotFoundError, ValueError):
                return False
        return read_metrics(self.dir) is not None


def read_metrics(stage_dir: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((stage_dir / "metrics.json").read_text())
        return m if isinstance(m, dict) and "acc1" in m else None
    except (OSError, ValueError):
        return None


class Protocol:
    """Plans and runs the stages of one experiment in ``out``."""

    def __init__(self, exp: dict[str, Any], out: Path, python: str = sys.executable) -> None:
        self.exp, self.out, self.python = exp, out, python
        self.hash = config_hash(exp)
        self.epochs = base_epochs(exp)
        model_cfg = (yaml.safe_load(Path(exp["base"]).read_text()) or {}).get("model") or {}
        self.arch = model_cfg.get("arch")

    # -- commands
    def _stage_cmd(self, st: Stage, extra: list[str]) -> list[str]:
        logger = st.dir / "stage.yaml"
        return [self.python, "-m", "lit_prune.stage", f"--stage_dir={st.dir}", f"--config={self.exp['base']}",
                f"--config={logger}", f"--seed_everything={st.seed}", *map(str, self.exp["args"]), *map(str, extra)]

    def _write_stage_yaml(self, st: Stage, tb_name: str) -> None:
        st.dir.mkdir(parents=True, exist_ok=True)
        doc = {"trainer": {"logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                      "init_args": {"save_dir": str(self.out / "tb"), "name": tb_name,
                                                    "version": f"seed{st.seed}"}}}}
        (st.dir / "stage.yaml").write_text(yaml.safe_dump(doc))

    def large_checkpoint(self, seed: int) -> str:
        given = self.exp["large"].get("checkpoint")
        return given if given else str(self.out / f"seed{seed}" / "large" / "checkpoints" / "last.ckpt")

    def plan(self) -> list[Stage]:
        stages: list[Stage] = []
        large_cfg = self.exp["large"]
        regimes = self.exp["regimes"]
        for seed in self.exp["seeds"]:
            root = self.out / f"seed{seed}"
            large = Stage(seed, None, "large", root / "large", epochs=self.epochs)
            if large_cfg.get("checkpoint") or large_cfg.get("weights"):
                source = large_cfg.get("checkpoint") or large_cfg.get("weights")
                large.command = self._stage_cmd(large, ["--trainer.max_epochs=0", f"--weights={source}"])
                large.epochs, large.note = 0, f"testing the given large model {source}"
            else:
                large.command = self._stage_cmd(large, list(large_cfg.get("args", [])))
            stages.append(large)
            for v in self.exp["variants"]:
                vdir = root / v["name"]
                artifact = vdir / "prune" / "pruned.pt"
                prune = Stage(seed, v["name"], "prune", vdir / "prune")
                if v.get("from_training"):
                    prune.note = f"artifact {v['from_training']} written by the large run's callback"
                elif v.get("width_config"):  # a predefined architecture: nothing is pruned, only built
                    prune.command = [self.python, "-m", "lit_prune.prune", f"--arch={v.get('arch', self.arch)}",
                                     f"--width-config={v['width_config']}", f"--out={artifact}"]
                else:
                    src = v.get("source")  # iterative pruning: prune the retrained model of an earlier variant
                    source = ([f"--checkpoint={root / src['variant'] / src['regime'] / 'model.pt'}"] if src
                              else self._prune_source(seed))
                    # data-driven methods (ThiNet, channel pruning) sample the base config's training data
                    prune.command = [self.python, "-m", "lit_prune.prune", *source, f"--config={v['method']}",
                                     f"--data-config={self.exp['base']}", f"--out={artifact}"]
                stages.append(prune)
                art = [f"--model.artifact={artifact}"]
                if v.get("arch"):  # another model than the base config's (ThiNet-GAP next to VGG-16)
                    art.append(f"--model.arch={v['arch']}")
                if not v.get("width_config"):  # a predefined architecture has no pruned weights to test
                    pruned = Stage(seed, v["name"], "pruned", vdir / "pruned", epochs=0)
                    pruned.command = self._stage_cmd(pruned, [*art, "--model.regime=finetune",
                                                              "--trainer.max_epochs=0"])
                    stages.append(pruned)
                for key, cfg in regimes.items():
                    st = Stage(seed, v["name"], key, vdir / key)
                    extra = [*art, f"--model.regime={cfg['regime']}", *map(str, cfg.get("args", []))]
                    st.epochs = int(_last_value(extra, "--trainer.max_epochs") or self.epochs)
                    st.command = self._stage_cmd(st, extra)
                    stages.append(st)
        return stages

    def _prune_source(self, seed: int) -> list[str]:
        large = self.exp["large"]
        if large.get("weights"):
            return [f"--arch={large['arch']}", f"--weights={large['weights']}"]
        return [f"--checkpoint={self.large_checkpoint(seed)}"]

    def scratch_b(self, st: Stage) -> list[str]:
        """Scratch-B's epochs and milestones from the FLOPs ratio of the artifact (known after pruning)."""
        art = load_artifact(self.out / f"seed{st.seed}" / st.variant / "prune" / "pruned.pt")
        cfg = self.exp["regimes"][st.kind]
        budget = scratch_b_budget(self.epochs, art["flops"]["ratio"], rule=cfg.get("rule", "fractions"),
                                  cap=cfg.get("cap"), base_milestones=base_milestones(self.exp))
        st.epochs = budget.epochs
        st.note = f"r = {budget.ratio:.3f}" + (f", capped at {budget.factor:g}" if budget.factor < budget.ratio else "")
        return [f"--trainer.max_epochs={budget.epochs}", "--model.schedule=multistep",
                f"--model.milestones={json.dumps(budget.milestones)}"]

    # -- running
    def prepare(self) -> None:
        """Tie the directory to this config, refusing one made by another config."""
        self.out.mkdir(parents=True, exist_ok=True)
        marker = self.out / "experiment.json"
        if marker.is_file():
            old = json.loads(marker.read_text())
            if old.get("hash") != self.hash:
                raise ExperimentError(
                    f"{self.out} holds results of another config (hash {old.get('hash')}, this one {self.hash}, "
                    f"experiment {old.get('name')!r}); use another --out, or delete that directory to start over")
        else:
            atomic_save_json({"name": self.exp["name"], "hash": self.hash, "config": self.exp}, marker)

    def run(self, *, dry_run: bool = False, verbose: bool = False) -> dict[str, Any]:
        stages = self.plan()
        if not dry_run:
            self.prepare()
        t_start = time.time()
        for i, st in enumerate(stages, 1):
            head = f"[{i}/{len(stages)}] {st.label}"
            if self.exp["regimes"].get(st.kind, {}).get("budget") == "compute":
                if dry_run and not (st.dir.parent / "prune" / "pruned.pt").is_file():
                    st.note = f"epochs = int({self.epochs} * r), r = FLOPs ratio measured after pruning"
                else:
                    st.command += self.scratch_b(st)
            if dry_run:
                epochs = f" ({st.epochs} epochs)" if st.epochs is not None else ""
                print(f"{head}{epochs}{' - ' + st.note if st.note else ''}")
                if st.command:
                    print("    " + shlex.join(st.command))
                continue
            if st.done():
                print(f"{head}: done, skipped")
                continue
            if st.kind == "prune" and not st.command:
                self._adopt_training_artifact(st)
                print(f"{head}: {st.note}")
                continue
            if st.kind != "prune":
                self._write_stage_yaml(st, self._tb_name(st))
            epochs = f", {st.epochs} epochs" if st.epochs else ""
            print(f"{head}{epochs}{' (' + st.note + ')' if st.note else ''} ...", flush=True)
            t0 = time.time()
            self._execute(st, verbose)
            m = read_metrics(st.dir)
            acc = f", test acc1 {100 * m['acc1']:.2f}%" if m else ""
            print(f"    done in {time.time() - t0:.1f} s{acc}", flush=True)
        if dry_run:
            return {}
        results = collect(self.exp, self.out)
        write_results(self.exp, self.out, results)
        print(f"\nall stages finished in {time.time() - t_start:.1f} s\n")
        print((self.out / "results.md").read_text())
        print(f"results: {self.out / 'results.md'}, {self.out / 'results.json'}, {self.out / 'results.png'}")
        print(f"TensorBoard: tensorboard --logdir {self.out / 'tb'}")
        return results

    def _tb_name(self, st: Stage) -> str:
        return st.kind if st.variant is None else f"{st.variant}/{st.kind}"

    def _adopt_training_artifact(self, st: Stage) -> None:
        v = next(v for v in self.exp["variants"] if v["name"] == st.variant)
        # callbacks write into the trainer's log directory, i.e. the large stage's TensorBoard run
        places = [self.out / "tb" / "large" / f"seed{st.seed}", self.out / f"seed{st.seed}" / "large"]
        found = [p for place in places for p in sorted(place.rglob(v["from_training"]))]
        if not found:
            raise ExperimentError(f"the large run of seed {st.seed} wrote no {v['from_training']} (looked in "
                                  f"{places[0]} and {places[1]}); does the base config (or large.args) attach the "
                                  "method's callback?")
        st.dir.mkdir(parents=True, exist_ok=True)
        load_artifact(found[0])  # validate before adopting
        shutil.copyfile(found[0], st.dir / "pruned.pt")

    def _execute(self, st: Stage, verbose: bool) -> None:
        st.dir.mkdir(parents=True, exist_ok=True)
        log_path = st.dir / "stage.log"
        with open(log_path, "ab") as log:
            proc = subprocess.run(st.command, stdout=None if verbose else log, stderr=subprocess.STDOUT if not verbose
                                  else None)
        if proc.returncode != 0:
            tail = "" if verbose else "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise ExperimentError(f"stage '{st.label}' failed (exit {proc.returncode}); log: {log_path}\n{tail}\n"
                                  f"command: {shlex.join(st.command)}")


# ---- results ----------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(exp: dict[str, Any], out: Path) -> dict[str, Any]:
    """Gather every stage's metrics into ``{variant: {row: {...}}}``."""
    results: dict[str, Any] = {"name": exp["name"], "seeds": exp["seeds"], "variants": {}}
    for v in exp["variants"]:
        rows: dict[str, Any] = {}
        for row in ("unpruned", "pruned", *exp["regimes"]):
            per_seed = []
            for seed in exp["seeds"]:
                sdir = out / f"seed{seed}" / ("large" if row == "unpruned" else f"{v['name']}/{row}")
                m = read_metrics(sdir)
                if m is not None:
                    per_seed.append(m)
            if not per_seed:
                continue
            accs = [100 * m["acc1"] for m in per_seed]
            mean, std = _mean_std(accs)
            rows[row] = {
                "acc1_mean": mean, "acc1_std": std, "n": len(accs), "acc1": accs,
                # global-threshold methods can give each seed its own width, hence its own Scratch-B budget
                "epochs": sorted({m["max_epochs"] for m in per_seed}),
                "milestones": per_seed[0].get("milestones"),
                "macs": per_seed[0].get("macs"), "params": per_seed[0].get("params"),
                "wall_time_s": statistics.fmean(m["wall_time_s"] for m in per_seed),
                "paper": (exp.get("paper") or {}).get(v["name"], {}).get(row),
            }
        art_path = out / f"seed{exp['seeds'][0]}" / v["name"] / "prune" / "pruned.pt"
        flops = load_artifact(art_path)["flops"] if art_path.is_file() else None
        results["variants"][v["name"]] = {"rows": rows, "flops": flops}
    return results


def write_results(exp: dict[str, Any], out: Path, results: dict[str, Any]) -> None:
    atomic_save_json(results, out / "results.json")
    lines = [f"# {exp['name']}", "",
             f"Final-epoch test top-1 accuracy (%), mean ± std over seeds {exp['seeds']}.", ""]
    for name, v in results["variants"].items():
        f = v["flops"]
        if f:
            lines.append(f"**{name}**: {f['pruned']['macs']:,} MACs, {f['pruned']['params']:,} params "
                         f"(unpruned {f['dense']['macs']:,} MACs, {f['dense']['params']:,} params; "
                         f"FLOPs ratio r = {f['ratio']:.3f})")
            lines.append("")
        lines += ["| | accuracy | n | epochs | wall time / seed | paper |", "|---|---|---|---|---|---|"]
        for row, r in v["rows"].items():
            budget = exp["regimes"].get(row, {}).get("budget")
            ms = f" (LR steps {r['milestones']})" if budget == "compute" and len(r["epochs"]) == 1 and r.get(
                "milestones") else ""
            lines.append(f"| {LABELS.get(row, row)} | {r['acc1_mean']:.2f} ± {r['acc1_std']:.2f} | {r['n']} | "
                         f"{'/'.join(map(str, r['epochs']))}{ms} | {r['wall_time_s']:.0f} s | {r['paper'] or ''} |")
        lines.append("")
    (out / ".results.md.tmp").write_text("\n".join(lines))
    (out / ".results.md.tmp").replace(out / "results.md")
    plot(results, out / "results.png")


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy per regime with error bars; accuracy against FLOPs when several variants ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    rows_all = list(dict.fromkeys(r for v in variants.values() for r in v["rows"]))
    several = len(variants) > 1
    fig, axes = plt.subplots(1, 2 if several else 1, figsize=(11 if several else 6, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(variants), 1)
    for j, (name, v) in enumerate(variants.items()):
        rows = [r for r in rows_all if r in v["rows"]]
        xs = [rows_all.index(r) + j * width for r in rows]
        means = [v["rows"][r]["acc1_mean"] for r in rows]
        bars = ax.bar(xs, means, width, yerr=[v["rows"][r]["acc1_std"] for r in rows], capsize=3, label=name)
        ax.bar_label(bars, labels=[f"{m:.2f}" for m in means], fontsize=7, padding=2)
    names = [LABELS.get(r, r).split(" (")[0] for r in rows_all]
    if "pruned" in rows_all:  # its bar usually falls below the zoomed axis: give its value in the label
        pruned = [f"{v['rows']['pruned']['acc1_mean']:.1f}" for v in variants.values() if "pruned" in v["rows"]]
        names[rows_all.index("pruned")] = f"Pruned\n({', '.join(pruned)})"
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows_all))], names, rotation=20)
    # zoom on the trained models; the pruned-but-not-retrained bar may fall below (its value is printed)
    accs = [r["acc1_mean"] for v in variants.values() for k, r in v["rows"].items() if k != "pruned"]
    if accs:
        ax.set_ylim(max(0.0, min(accs) - 3), min(100.0, max(accs) + 1.5))
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(results["name"])
    ax.legend(title="pruned model", loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(variants), 4),
              fontsize=8)
    if several:
        ax2 = axes[0][1]
        for regime in [r for r in rows_all if r not in ("unpruned", "pruned")]:
            pts = sorted((v["flops"]["pruned"]["macs"], v["rows"][regime]["acc1_mean"], v["rows"][regime]["acc1_std"])
                         for v in variants.values() if v["flops"] and regime in v["rows"])
            if pts:
                ax2.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o", capsize=3,
                             label=LABELS.get(regime, regime))
        ax2.set_xlabel("MACs of the pruned model")
        ax2.set_ylabel("test top-1 accuracy (%)")
        ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.rethink", description=__doc__.split("\n")[0],
                                     epilog="The experiment config is described in lit_prune/rethink.py.")
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--out", help="experiment directory (default: the config's 'out', or runs/rethink/NAME)")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's command and epochs, run nothing")
    parser.add_argument("--verbose", action="store_true", help="stream every stage's output instead of logging it")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config)
        out = Path(args.out or exp.get("out") or Path("runs") / "rethink" / exp["name"])
        Protocol(exp, out).run(dry_run=args.dry_run, verbose=args.verbose)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
