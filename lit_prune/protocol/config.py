"""The experiment config of the protocol runner: its schema, validated once when it is loaded.

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
      scratch_b: {rule: fractions, cap: null, convention: macs, args: []}  # rules: fractions, thirds, scale,
      #   multiples; convention of the FLOPs ratio r: macs (conv + linear MACs, the tables' numbers) or
      #   reference (the paper's compute_flops.py, with BN, ReLU and pooling: how its epochs were computed)
      # more regimes: NAME: {regime: finetune | scratch | rewind, budget: same | compute, args: [...]}
      # Section 5 controls and searches (lit_prune.search builds their artifacts; see its docstring):
      - {name: B-uniform, uniform: {of: B, match: params}}  # one width multiplier (one sparsity if masked)
      - {name: B-random, random: {of: B}}                   # B's widths, channels (weights) chosen at random
      - {name: B-guided, guided: {of: [B]}}                 # B's mean kept ratio per stage, from scratch
      #   guided: {from: runs/rethink/other, variant: p70}   ... of another experiment's artifacts (transfer)
      # optional on any variant: regimes: [scratch_e]      the regimes it trains (default: all of them; a
      #   fresh architecture (width_config, uniform, guided) the scratch ones, a random control the finetune ones)
      #   method_args: {prune_ratio: 0.5}                  overrides of the method config's init_args
      #   sweep: {ratio: [0.3, 0.5]}                       one variant per value, "{ratio}" replaced in its
      #   fields; its name gets "_ratio0.3" unless it holds "{ratio}" itself. Regimes take a sweep the same
      #   way (regimes.finetune.sweep: {lr: [0.01, 0.001]}), and so does the whole file (a top-level
      #   sweep: {lr: [0.01, 0.1]} makes one experiment per value, each with its own name and directory).
    paper:                                 # optional: numbers printed beside ours, per variant
      B: {unpruned: "93.14 +-0.12 [RW]", scratch_b: "93.05 +-0.18 [RW]"}
    out: null                              # optional: the experiment directory (default runs/rethink/NAME)

Paths are relative to the working directory. Every stage's epochs and LR milestones are read from its
resolved train.py config: the base config, then every ``--config FILE`` (or ``--trainer FILE``,
``--model FILE``) in its arguments in order, then explicit ``--trainer.max_epochs`` / ``--model.milestones``
flags, the last one winning as in LightningCLI. The config's hash (kept in the experiment directory) covers
the config and every file it names: the base config, the method configs and the files named in ``args``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

REGIMES = ("finetune", "scratch_e", "scratch_b")  # the paper's three; configs may name more (lottery arms)
# How each regime starts from the artifact (ImageClassifier's regime) and which budget it trains for.
DEFAULTS = {"finetune": {"regime": "finetune", "budget": "same"},
            "scratch_e": {"regime": "scratch", "budget": "same"},
            "scratch_b": {"regime": "scratch", "budget": "compute"}}
RULES = ("fractions", "thirds", "scale", "multiples")  # lit_prune.core.budget.RULES (importing it costs torch)
CONVENTIONS = ("macs", "reference")  # lit_prune.core.flops.CONVENTIONS, Scratch-B's FLOPs ratio
HASH_VERSION = 2  # 1 (no "hash_version" in experiment.json): the --config files named in args were not hashed

_TOP_KEYS = {"name", "base", "seeds", "args", "large", "variants", "regimes", "paper", "out", "sweep"}
_LARGE_KEYS = {"args", "checkpoint", "arch", "weights"}
_VARIANT_KEYS = {"name", "method", "from_training", "width_config", "arch", "source", "method_args", "uniform",
                 "random", "guided", "regimes", "sweep"}
#: how a variant's artifact comes about; exactly one per variant
VARIANT_KINDS = ("method", "from_training", "width_config", "uniform", "random", "guided")
#: kinds whose artifact is an architecture with fresh weights: nothing to fine-tune or test before training
FRESH_KINDS = ("width_config", "uniform", "guided")
MATCHES = ("params", "flops")  # what a uniform baseline matches (lit_prune.search.uniform)
_UNIFORM_KEYS = {"of", "match"}
_RANDOM_KEYS = {"of"}
_GUIDED_KEYS = {"of", "from", "variant"}
_SOURCE_KEYS = {"variant", "regime"}
_REGIME_KEYS = {"regime", "budget", "rule", "cap", "convention", "args", "sweep"}
# Names become directories next to the runner's own (seed<N>/large, seed<N>/<variant>/prune, .../pruned)
# and rows of the results table (unpruned, pruned).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_RESERVED_VARIANTS = {"large"}
_RESERVED_REGIMES = {"large", "prune", "pruned", "unpruned"}

# What the runner reads from a stage's resolved config, and where it sits in a train.py config.
_SETTINGS = {"--trainer.max_epochs": ("trainer", "max_epochs"), "--model.milestones": ("model", "milestones"),
             "--model.arch": ("model", "arch")}
_CONFIG_FLAGS = ("--config", "-c")  # LightningCLI's config file options
_GROUP_FLAGS = {"--trainer": "trainer", "--model": "model", "--data": "data"}  # a group's own config file


class ExperimentError(ValueError):
    """A problem with the experiment's config or directory, worded for the user."""


@dataclass(frozen=True)
class LargeConfig:
    """How the large model of every seed comes about: trained (with ``args``) or given."""

    args: tuple[str, ...] = ()
    checkpoint: str | None = None  # a Lightning checkpoint to start from instead of training
    arch: str | None = None  # ... or torchvision-format weights of this zoo model
    weights: str | None = None

    @property
    def given(self) -> str | None:
        """The file of a large model that is not trained here."""
        return self.checkpoint or self.weights


@dataclass(frozen=True)
class SourceRef:
    """Prune the retrained model of an earlier variant's regime (iterative pruning, lottery rounds)."""

    variant: str
    regime: str


@dataclass(frozen=True)
class BaselineRef:
    """A control built from an earlier variant's artifact: its uniform counterpart or its random selection."""

    of: str
    match: str = "params"  # uniform only: params | flops


@dataclass(frozen=True)
class GuidedRef:
    """Guided pruning (or sparsification): the stage-wise pattern of earlier variants' artifacts (``of``), or of
    the finished variant ``variant`` of another experiment directory ``source_dir`` (transferred)."""

    of: tuple[str, ...] = ()
    source_dir: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class VariantConfig:
    """One pruned model: exactly one of ``method``, ``from_training``, ``width_config``, ``uniform``, ``random``,
    ``guided`` (:data:`VARIANT_KINDS`)."""

    name: str
    method: str | None = None  # a method config, one-shot pruning of the large model
    from_training: str | None = None  # the artifact file the large run's callback writes (SFP)
    width_config: str | None = None  # a predefined architecture: nothing pruned, only built
    arch: str | None = None  # another zoo model than the base config's
    source: SourceRef | None = None
    method_args: Mapping[str, Any] | None = None  # overrides of the method config's init_args
    uniform: BaselineRef | None = None
    random: BaselineRef | None = None
    guided: GuidedRef | None = None
    regimes: tuple[str, ...] | None = None  # the regimes it trains (None: by its kind, see regimes_of)

    @property
    def kind(self) -> str:
        return next(k for k in VARIANT_KINDS if getattr(self, k))

    @property
    def fresh(self) -> bool:
        """An architecture with fresh weights (nothing inherited): trained from scratch only."""
        return self.kind in FRESH_KINDS


@dataclass(frozen=True)
class RegimeConfig:
    """How a regime starts from the artifact and how long it trains."""

    name: str
    regime: str  # finetune | scratch | rewind (ImageClassifier's regime)
    budget: str = "same"  # same (Scratch-E) | compute (Scratch-B)
    rule: str = "fractions"
    cap: float | None = None
    args: tuple[str, ...] = ()
    convention: str = "macs"  # FLOPs convention of a compute budget's ratio (lit_prune.core.flops)

    @property
    def compute(self) -> bool:
        return self.budget == "compute"


@dataclass(frozen=True)
class StageSettings:
    """What the runner needs from a stage's resolved train.py config."""

    max_epochs: int | None
    milestones: list[int] | None
    arch: str | None


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment config, with the contents of every file it names (read once)."""

    path: Path
    name: str
    base: str
    seeds: tuple[int, ...]
    args: tuple[str, ...]
    large: LargeConfig
    variants: tuple[VariantConfig, ...]
    regimes: Mapping[str, RegimeConfig]
    paper: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    out: str | None = None
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # base, methods, files named in args
    docs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)  # parsed train.py configs
    legacy_hash: str = ""  # this config's hash under HASH_VERSION 1, to recognise a directory it made

    def variant(self, name: str) -> VariantConfig:
        return next(v for v in self.variants if v.name == name)

    def regimes_of(self, v: VariantConfig) -> list[str]:
        """The regimes variant ``v`` trains: its own list, else every regime, except that a fresh architecture
        (:data:`FRESH_KINDS`) trains the scratch ones only and a random control the finetune ones only (it
        answers whether the method's choice of weights matters for fine-tuning)."""
        if v.regimes is not None:
            return list(v.regimes)
        if v.fresh:
            return [k for k, r in self.regimes.items() if r.regime == "scratch"]
        if v.random:
            return [k for k, r in self.regimes.items() if r.regime == "finetune"]
        return list(self.regimes)

    def to_dict(self) -> dict[str, Any]:
        """The normalised config as plain containers (what experiment.json keeps)."""

        def variant(v: VariantConfig) -> dict[str, Any]:
            d = {k: getattr(v, k) for k in ("name", "method", "from_training", "width_config", "arch")}
            d["source"] = {"variant": v.source.variant, "regime": v.source.regime} if v.source else None
            # the Section-5 keys only where set: a config without them keeps the hash it had before they existed
            d["method_args"] = dict(v.method_args) if v.method_args is not None else None
            d["uniform"] = {"of": v.uniform.of, "match": v.uniform.match} if v.uniform else None
            d["random"] = {"of": v.random.of} if v.random else None
            d["guided"] = ({"of": list(v.guided.of), "from": v.guided.source_dir, "variant": v.guided.variant}
                           if v.guided else None)
            d["regimes"] = list(v.regimes) if v.regimes is not None else None
            return {k: x for k, x in d.items() if x is not None}

        return {
            "name": self.name, "base": self.base, "seeds": list(self.seeds), "args": list(self.args),
            "large": {"args": list(self.large.args), "checkpoint": self.large.checkpoint, "arch": self.large.arch,
                      "weights": self.large.weights},
            "variants": [variant(v) for v in self.variants],
            # the convention only where it is not the default, so that a directory made before it existed keeps
            # its hash
            "regimes": {k: {"regime": r.regime, "budget": r.budget, "rule": r.rule, "cap": r.cap, "args": list(r.args),
                            **({"convention": r.convention} if r.convention != "macs" else {})}
                        for k, r in self.regimes.items()},
            "paper": {k: dict(v) for k, v in self.paper.items()}, "out": self.out,
        }

    @cached_property
    def hash(self) -> str:
        """Hash of everything that decides the results: the config and the content of every file it names."""
        body = {k: v for k, v in self.to_dict().items() if k not in ("paper", "out")}
        h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
        for name, content in self.files.items():
            h.update(f"\0{name}\0{len(content)}\0".encode())
            h.update(content)
        return h.hexdigest()[:16]

    def file_digests(self) -> dict[str, str]:
        """Per-file hashes, kept in experiment.json to name the file that changed."""
        return {name: hashlib.sha256(content).hexdigest()[:16] for name, content in self.files.items()}

    @property
    def arg_files(self) -> list[str]:
        """The files named in ``args`` lists (``--config FILE``), which the old hash did not cover."""
        legacy = {self.base, *(v.method for v in self.variants if v.method)}
        return [f for f in self.files if f not in legacy]

    def all_args(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Every ``args`` list of the config, with where it is."""
        yield "args", self.args
        yield "large.args", self.large.args
        for key, r in self.regimes.items():
            yield f"regimes.{key}.args", r.args

    def resolve(self, argv: Sequence[str]) -> StageSettings:
        """The epochs, milestones and arch of a stage run with the base config and ``argv`` (in LightningCLI's
        order: a later ``--config`` or flag overrides an earlier one)."""
        values = {flag: _lookup(self.docs[self.base], path) for flag, path in _SETTINGS.items()}
        for name, value in _options(argv):
            if name in _CONFIG_FLAGS or name in _GROUP_FLAGS:
                doc = self.docs.get(value or "")
                if doc is None:
                    continue
                group = _GROUP_FLAGS.get(name)
                for flag, path in _SETTINGS.items():
                    if group is None or path[0] == group:
                        found = _lookup(doc, path if group is None else path[1:])
                        if found is not _MISSING:
                            values[flag] = found
            elif name in _SETTINGS:
                values[name] = None if value is None else yaml.safe_load(value)
        epochs, milestones, arch = (None if v is _MISSING else v for v in values.values())
        if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool)):
            raise ExperimentError(f"trainer.max_epochs must be an integer, got {epochs!r} (from {list(argv)})")
        if milestones is not None and not (isinstance(milestones, list) and
                                           all(isinstance(m, int) for m in milestones)):
            raise ExperimentError(f"model.milestones must be a list of integers, got {milestones!r}")
        return StageSettings(epochs, None if milestones is None else list(milestones), arch)


_MISSING = object()
_OPTION = re.compile(r"--?[A-Za-z_]")


def _lookup(doc: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(doc, Mapping) or key not in doc:
            return _MISSING
        doc = doc[key]
    return doc


def _options(argv: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """``(option, value)`` of a train.py command line, ``--opt=value`` and ``--opt value`` alike."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) and not _OPTION.match(argv[i + 1]) else None
                i += value is not None
            yield name, value
        i += 1


def _abbreviated(name: str) -> str | None:
    """The option the runner reads that ``name`` abbreviates (argparse accepts unique prefixes)."""
    if not name.startswith("--") or name in _SETTINGS or name in _CONFIG_FLAGS or name in _GROUP_FLAGS:
        return None
    if name == "--model.milestones+":
        return "--model.milestones"
    for full in (*_SETTINGS, "--config"):
        group = full.split(".")[0] + "." if "." in full else "--"
        if full.startswith(name) and len(name) > len(group):
            return full
    return None


# ---- loading ------------------------------------------------------------------------------------------
_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _label(value: Any) -> str:
    """How a swept value appears in a generated name: a config file by its stem, anything else as written."""
    if isinstance(value, str) and ("/" in value or value.endswith((".yaml", ".yml"))):
        return Path(value).stem
    return str(value).lower() if isinstance(value, bool) else str(value)


def substitute(value: Any, point: Mapping[str, Any]) -> Any:
    """``value`` with every ``{axis}`` of ``point`` replaced: a string that is only ``"{axis}"`` becomes the value
    itself (a number stays a number), a longer one gets its text; braces that name no axis stay as they are
    (inline YAML in arguments)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(1) in point:
            return point[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(point[m.group(1)]) if m.group(1) in point else m.group(0), value)
    if isinstance(value, Mapping):
        return {k: substitute(v, point) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, point) for v in value]
    return value


def swept_name(template: str, point: Mapping[str, Any]) -> str:
    """The generated name of one point of a sweep: ``{axis}`` in ``template`` replaced by the value's label, and
    ``_<axis><label>`` appended for every axis the template does not mention (``l1`` -> ``l1_ratio0.3``)."""
    name = _PLACEHOLDER.sub(lambda m: _label(point[m.group(1)]) if m.group(1) in point else m.group(0), template)
    return name + "".join(f"_{axis}{_label(v)}" for axis, v in point.items() if "{" + axis + "}" not in template)


def _read_doc(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExperimentError(f"no experiment config at {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(doc, Mapping):
        raise ExperimentError(f"{path} is not an experiment config (a mapping)")
    return dict(doc)


def load_experiments(path: str | Path, select: Mapping[str, str] | None = None) -> list[ExperimentConfig]:
    """Every experiment of a config file: one, or one per point of its top-level ``sweep`` (each with the
    generated name, and ``out`` if it names one); ``select`` keeps the points whose axes have these values
    (compared as written in the generated names, e.g. ``{"lr": "0.1"}``).

    Raises:
        ExperimentError: a bad config or sweep, or a ``select`` that matches no point (the message lists them).
    """
    path = Path(path)
    doc = _read_doc(path)
    loader = _Loader(path)
    if "sweep" not in doc:
        if select:
            raise ExperimentError(f"{path} has no top-level sweep to select {dict(select)} from")
        return [loader.load(doc)]
    points = loader.points(doc["sweep"], "sweep")
    body = {k: v for k, v in doc.items() if k != "sweep"}
    if not isinstance(body.get("name"), str):
        raise ExperimentError(f"{path}: 'name' is required, a template such as lottery_lr{{lr}}")
    if body.get("out") is not None and len(points) > 1 and not _PLACEHOLDER.search(str(body["out"])):
        raise ExperimentError(f"{path}: out {body['out']!r} would hold every experiment of the sweep; write the axes "
                              "into it, e.g. runs/lottery_lr{lr}")
    unknown = set(select or {}) - set(points[0])
    if unknown:
        raise ExperimentError(f"{path}: --select names unknown axes {sorted(unknown)}; the sweep's: {list(points[0])}")
    chosen = [p for p in points if all(_label(p[a]) == str(want) for a, want in (select or {}).items())]
    if not chosen:
        values = {a: list(dict.fromkeys(_label(p[a]) for p in points)) for a in points[0]}
        raise ExperimentError(f"{path}: no point of the sweep has {dict(select or {})}; the axes' values: {values}")
    configs = []
    for point in chosen:
        exp = substitute(body, point)
        exp["name"] = swept_name(body["name"], point)
        configs.append(_Loader(path).load(exp))
    return configs


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment config; relative paths in it are relative to the working directory.

    Raises:
        ExperimentError: a bad config, or a file that sweeps several experiments (:func:`load_experiments`).
    """
    configs = load_experiments(path)
    if len(configs) > 1:
        raise ExperimentError(f"{path} is a sweep of {len(configs)} experiments ({', '.join(c.name for c in configs)})"
                              f"; python -m lit_prune.rethink --config {path} runs them all (--select AXIS=VALUE "
                              "picks some), and load_experiments loads them")
    return configs[0]


class _Loader:
    """Builds an ExperimentConfig from the parsed YAML, refusing anything the runner would not use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, bytes] = {}
        self.docs: dict[str, Mapping[str, Any]] = {}

    def fail(self, message: str) -> ExperimentError:
        return ExperimentError(f"{self.path}: {message}")

    def mapping(self, value: Any, where: str, known: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"{where} must be a mapping, got {value!r}")
        unknown = set(map(str, value)) - known
        if unknown:
            prefix = f"{where}: unknown keys" if where else "unknown keys"
            raise self.fail(f"{prefix} {sorted(unknown)}; known: {sorted(known)}")
        return dict(value)

    def arg_list(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(f"{where} must be a list of train.py arguments, e.g. [--trainer.devices=4], "
                            f"got {value!r}")
        bad = [a for a in value if isinstance(a, (dict, list)) or a is None]
        if bad:
            raise self.fail(f"{where}: every argument must be a string, got {bad[0]!r}")
        args = tuple(map(str, value))
        for name, _ in _options(args):
            full = _abbreviated(name)
            if full is not None:
                raise self.fail(f"{where}: {name} abbreviates {full}; write the option in full (the runner reads "
                                f"{full} to plan the stages and their epochs)")
        return args

    def name(self, value: Any, what: str, reserved: set[str]) -> str:
        name = str(value)  # `name: 70` is an int in YAML; names become paths and table headings
        if not _NAME.fullmatch(name) or name in reserved:
            raise self.fail(f"{what} {name!r} is not a valid name: names become directories (letters, digits, "
                            f"'_', '-', '.', '+'), and {sorted(reserved)} are the runner's own")
        return name

    def read(self, file: str) -> bytes:
        if file not in self.files:
            self.files[file] = Path(file).read_bytes()
        return self.files[file]

    def parse(self, file: str, where: str) -> Mapping[str, Any]:
        try:
            doc = yaml.safe_load(self.read(file)) or {}
        except yaml.YAMLError as err:
            raise self.fail(f"{where}: {file} is not valid YAML: {err}") from None
        if not isinstance(doc, Mapping):
            raise self.fail(f"{where}: {file} is not a train.py config (a mapping)")
        return doc

    def named_configs(self, args: tuple[str, ...], where: str) -> None:
        """Read (hash) and parse every config file an argument list names."""
        for name, value in _options(args):
            if name not in _CONFIG_FLAGS and name not in _GROUP_FLAGS or value is None or value in self.docs:
                continue
            if Path(value).is_file():
                self.docs[value] = self.parse(value, where)
                continue
            inline = _inline_yaml(value)
            if inline is not None:  # jsonargparse also takes a config as a YAML string
                self.docs[value] = inline
            elif name in _CONFIG_FLAGS:
                raise self.fail(f"{where}: {name} {value} does not exist")

    def points(self, sweep: Any, where: str) -> list[dict[str, Any]]:
        """The points of a sweep ``{axis: [values]}``: every combination, in the order the axes are written."""
        if not isinstance(sweep, Mapping) or not sweep:
            raise self.fail(f"{where} must map axis names to lists of values, e.g. {{ratio: [0.3, 0.5]}}, "
                            f"got {sweep!r}")
        for axis, values in sweep.items():
            if not isinstance(axis, str) or not _AXIS.fullmatch(axis):
                raise self.fail(f"{where}: axis name {axis!r} must be a word (letters, digits, '_'): it is written "
                                "as {axis} in the swept fields")
            if not isinstance(values, list) or not values or any(isinstance(x, (dict, list)) or x is None
                                                                 for x in values):
                raise self.fail(f"{where}.{axis} must be a non-empty list of plain values (numbers, strings), got "
                                f"{values!r}")
            if len({_label(x) for x in values}) != len(values):
                raise self.fail(f"{where}.{axis} has repeated values {values}: each value names its own run")
        return [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]

    def expand_sweeps(self, exp: dict[str, Any]) -> dict[str, Any]:
        """``exp`` with every variant and regime that has a ``sweep`` replaced by one per point of it."""
        exp = dict(exp)
        if isinstance(exp.get("variants"), list):
            variants = []
            for i, v in enumerate(exp["variants"]):
                if not isinstance(v, Mapping) or "sweep" not in v:
                    variants.append(v)
                    continue
                body = {k: x for k, x in v.items() if k != "sweep"}
                for point in self.points(v["sweep"], f"variants[{i}].sweep"):
                    swept = substitute(body, point)
                    if body.get("name") is not None:
                        swept["name"] = swept_name(str(body["name"]), point)
                    variants.append(swept)
            exp["variants"] = variants
        if isinstance(exp.get("regimes"), Mapping):
            regimes: dict[Any, Any] = {}
            for key, cfg in exp["regimes"].items():
                if not isinstance(cfg, Mapping) or "sweep" not in cfg:
                    regimes[key] = cfg
                    continue
                body = {**DEFAULTS.get(str(key), {}), **{k: x for k, x in cfg.items() if k != "sweep"}}
                for point in self.points(cfg["sweep"], f"regimes.{key}.sweep"):
                    regimes[swept_name(str(key), point)] = substitute(body, point)
            exp["regimes"] = regimes
        return exp

    def load(self, doc: Any) -> ExperimentConfig:
        exp = self.mapping(doc, "", _TOP_KEYS)
        if "sweep" in exp:
            raise self.fail("a top-level sweep makes several experiments: load them with load_experiments")
        exp = self.expand_sweeps(exp)
        legacy_doc = copy.deepcopy(exp)
        for key in ("name", "base", "variants"):
            if not exp.get(key):
                raise self.fail(f"'{key}' is required (see python -m lit_prune.rethink --help)")
        base = str(exp["base"])
        if not Path(base).is_file():
            raise self.fail(f"base config {base} does not exist")
        self.docs[base] = self.parse(base, "base")

        seeds = exp.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
            raise self.fail(f"seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise self.fail(f"seeds must be distinct (each seed has its own directory), got {seeds}")
        args = self.arg_list(exp.get("args"), "args")

        large_doc = self.mapping(exp.get("large"), "large", _LARGE_KEYS)
        large = LargeConfig(self.arg_list(large_doc.get("args"), "large.args"),
                            *(None if large_doc.get(k) is None else str(large_doc[k])
                              for k in ("checkpoint", "arch", "weights")))

        regimes_doc = exp.get("regimes", {r: {} for r in REGIMES})
        if not isinstance(regimes_doc, Mapping) or not regimes_doc:
            raise self.fail(f"regimes must be a mapping of regime names to settings, got {regimes_doc!r}")
        regimes = {}
        for key, cfg in regimes_doc.items():
            key = self.name(key, "regime", _RESERVED_REGIMES)
            regimes[key] = self.regime(key, {**DEFAULTS.get(key, {}), **self.mapping(cfg, f"regimes.{key}",
                                                                                   _REGIME_KEYS)})

        if not isinstance(exp["variants"], list):
            raise self.fail(f"variants must be a list, got {exp['variants']!r}")
        variants: list[VariantConfig] = []
        for i, v in enumerate(exp["variants"]):
            variants.append(self.variant(i, v, variants, regimes))

        paper = exp.get("paper") or {}
        if not isinstance(paper, Mapping):
            raise self.fail(f"paper must be a mapping of variant names to rows, got {paper!r}")
        paper = {str(k): dict(self.mapping(v, f"paper.{k}", {"unpruned", "pruned", *regimes}))
                 for k, v in paper.items()}
        unknown = set(paper) - {v.name for v in variants}
        if unknown:
            raise self.fail(f"paper: unknown variants {sorted(unknown)}; known: {[v.name for v in variants]}")

        if large.checkpoint and not Path(large.checkpoint).is_file():
            raise self.fail(f"large.checkpoint {large.checkpoint} does not exist")
        if large.weights and not large.arch:
            raise self.fail("large.weights needs large.arch (the zoo model the weights are for)")
        for v in variants:
            if v.method:
                self.read(v.method)
        config = ExperimentConfig(self.path, str(exp["name"]), base, tuple(seeds), args, large, tuple(variants),
                                  regimes, paper, None if exp.get("out") is None else str(exp["out"]))
        for where, arg_list in config.all_args():
            self.named_configs(arg_list, where)
        config = replace(config, files=dict(self.files), docs=dict(self.docs),
                         legacy_hash=_legacy_hash(legacy_doc, self.files))
        large_epochs = config.resolve([*config.args, *config.large.args]).max_epochs
        if not large_epochs:
            raise ExperimentError(f"{base} sets no trainer.max_epochs; Scratch-E/B need the large model's epochs")
        return config

    def regime(self, key: str, cfg: dict[str, Any]) -> RegimeConfig:
        if cfg.get("regime") not in ("finetune", "scratch", "rewind"):
            raise self.fail(f"regime {key!r} needs 'regime: finetune | scratch | rewind' (the "
                            f"paper's {', '.join(REGIMES)} have it by default)")
        if cfg.get("budget", "same") not in ("same", "compute"):
            raise self.fail(f"regime {key!r}: budget must be 'same' (Scratch-E) or 'compute' "
                            f"(Scratch-B), got {cfg['budget']!r}")
        if cfg.get("cap") is not None and (not isinstance(cfg["cap"], (int, float)) or float(cfg["cap"]) < 1):
            raise self.fail(f"regime {key!r}: the Scratch-B cap must be >= 1 (the paper uses 2.0 on "
                            f"ImageNet), got {cfg['cap']}")
        if cfg.get("rule", "fractions") not in RULES:
            raise self.fail(f"regime {key!r}: rule must be one of {', '.join(RULES)}, got {cfg.get('rule')!r}")
        convention = cfg.get("convention", "macs")
        if convention not in CONVENTIONS:
            raise self.fail(f"regime {key!r}: convention must be one of {', '.join(CONVENTIONS)} (the FLOPs "
                            f"counted for Scratch-B's ratio), got {convention!r}")
        if "convention" in cfg and cfg.get("budget", "same") != "compute":
            raise self.fail(f"regime {key!r}: convention is the FLOPs convention of a compute budget "
                            "(Scratch-B); this regime has budget 'same'")
        return RegimeConfig(key, cfg["regime"], cfg.get("budget", "same"), cfg.get("rule", "fractions"),
                            None if cfg.get("cap") is None else float(cfg["cap"]),
                            self.arg_list(cfg.get("args"), f"regimes.{key}.args"), convention)

    def variant(self, i: int, v: Any, earlier: list[VariantConfig], regimes: Mapping[str, Any]) -> VariantConfig:
        v = self.mapping(v, f"variants[{i}]", _VARIANT_KEYS)
        if v.get("name") is None:
            raise self.fail(f"every variant needs a unique name, got {[w.name for w in earlier] + [None]}")
        name = self.name(v["name"], "variant", _RESERVED_VARIANTS)
        if name in {w.name for w in earlier}:
            raise self.fail(f"every variant needs a unique name, got {[w.name for w in earlier] + [name]}")
        names = [w.name for w in earlier]
        source = None
        if v.get("source") is not None:
            src = self.mapping(v["source"], f"variant {name!r}: source", _SOURCE_KEYS)
            if str(src.get("variant")) not in names or src.get("regime") not in regimes:
                raise self.fail(f"variant {name!r}: source must name an earlier variant "
                                f"({names}) and a regime ({list(regimes)}), got {v['source']}")
            source = SourceRef(str(src["variant"]), str(src["regime"]))
        if sum(bool(v.get(k)) for k in VARIANT_KINDS) != 1:
            raise self.fail(f"variant {name!r} needs one of 'method' (a method config), "
                            "'from_training' (an artifact its large run writes), 'width_config' (a predefined "
                            "architecture of the base model), 'uniform' or 'random' (controls of an earlier "
                            "variant: {of: NAME}) or 'guided' (stage ratios of earlier variants: {of: [NAMES]})")
        if v.get("width_config") and "finetune" in regimes and v.get("regimes") is None:
            raise self.fail(f"variant {name!r} is a predefined architecture without trained "
                            "weights: drop the finetune regime (the paper's Fine-tuned column came from the "
                            "original authors' released models)")
        if v.get("method") and not Path(v["method"]).is_file():
            raise self.fail(f"variant {name!r}: method config {v['method']} does not exist")
        if source is not None and not v.get("method"):
            raise self.fail(f"variant {name!r}: source needs a 'method' (the pruning of the source's model)")
        method_args = v.get("method_args")
        if method_args is not None and (not v.get("method") or not isinstance(method_args, Mapping)):
            raise self.fail(f"variant {name!r}: method_args is a mapping of overrides of the method config's "
                            f"init_args (e.g. {{prune_ratio: 0.5}}), with 'method'; got {method_args!r}")
        uniform = random = guided = None
        if v.get("uniform"):
            u = self.mapping(v["uniform"], f"variant {name!r}: uniform", _UNIFORM_KEYS)
            match = u.get("match", "params")
            if match not in MATCHES:
                raise self.fail(f"variant {name!r}: uniform.match must be one of {', '.join(MATCHES)} (what the "
                                f"uniform architecture has as many of as the method's), got {match!r}")
            uniform = BaselineRef(self.earlier(name, u.get("of"), names, "uniform"), match)
        if v.get("random"):
            r = self.mapping(v["random"], f"variant {name!r}: random", _RANDOM_KEYS)
            random = BaselineRef(self.earlier(name, r.get("of"), names, "random"))
        if v.get("guided"):
            guided = self.guided(name, v["guided"], names)
        own = v.get("regimes")
        if own is not None:
            if not isinstance(own, list) or not own or any(str(r) not in regimes for r in own):
                raise self.fail(f"variant {name!r}: regimes must be a non-empty list of the config's regimes "
                                f"({list(regimes)}), got {own!r}")
            own = tuple(map(str, own))
        fresh = any(v.get(k) for k in FRESH_KINDS)
        trained = own if own is not None else [k for k, r in regimes.items() if (
            r.regime == "scratch" if fresh else r.regime == "finetune" if random else True)]
        if fresh and any(regimes[k].regime != "scratch" for k in trained):
            raise self.fail(f"variant {name!r} is an architecture with fresh weights: it trains from scratch only, "
                            f"not {[k for k in trained if regimes[k].regime != 'scratch']}")
        if not trained:
            what, needs = ("fresh architecture", "scratch") if fresh else ("random control", "finetune")
            raise self.fail(f"variant {name!r} has no regime to train: a {what} needs a {needs} regime")
        return VariantConfig(name, *(None if not v.get(k) else str(v[k])
                                     for k in ("method", "from_training", "width_config", "arch")), source,
                             dict(method_args) if method_args is not None else None, uniform, random, guided, own)

    def earlier(self, name: str, of: Any, names: list[str], what: str) -> str:
        if of is None or str(of) not in names:
            raise self.fail(f"variant {name!r}: {what}.of must name an earlier variant ({names}), got {of!r}")
        return str(of)

    def guided(self, name: str, value: Any, names: list[str]) -> GuidedRef:
        g = self.mapping(value, f"variant {name!r}: guided", _GUIDED_KEYS)
        if ("of" in g) == ("from" in g):
            raise self.fail(f"variant {name!r}: guided needs 'of' (earlier variants of this experiment, e.g. [p70]) "
                            "or 'from' (another experiment's directory) with 'variant' (its variant)")
        if "from" in g:
            if not g.get("variant"):
                raise self.fail(f"variant {name!r}: guided.from needs guided.variant (the variant of "
                                f"{g['from']} whose artifacts give the ratios)")
            return GuidedRef((), str(g["from"]), str(g["variant"]))
        of = g["of"] if isinstance(g["of"], list) else [g["of"]]
        return GuidedRef(tuple(self.earlier(name, o, names, "guided") for o in of))


def _inline_yaml(value: str) -> Mapping[str, Any] | None:
    try:
        doc = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, Mapping) else None


def _legacy_hash(doc: dict[str, Any], files: Mapping[str, bytes]) -> str:
    """The hash lit-prune wrote into experiment.json before HASH_VERSION 2 (the config and the base and
    method files, not the files named in args), so that a directory it made is recognised."""
    exp = copy.deepcopy(doc)
    exp.setdefault("seeds", [0])
    exp.setdefault("args", [])
    exp.setdefault("large", {})
    exp.setdefault("regimes", {r: {} for r in REGIMES})
    exp["regimes"] = {k: {**DEFAULTS.get(k, {}), **(cfg or {})} for k, cfg in exp["regimes"].items()}
    for v in exp["variants"]:
        if v.get("name") is not None:
            v["name"] = str(v["name"])
    h = hashlib.sha256(json.dumps({k: v for k, v in exp.items() if k not in ("paper", "out")}, sort_keys=True,
                                  default=str).encode())
    for f in [exp["base"]] + [v["method"] for v in exp["variants"] if v.get("method")]:
        h.update(files[str(f)])
    return h.hexdigest()[:16]


def config_hash(config: ExperimentConfig) -> str:
    """Hash of everything that decides the results (the config and the files it names)."""
    return config.hash
