"""``train.py fit --ckpt_path``: resume the run that wrote the checkpoint, or refuse.

Two things Lightning does not check:

* **A checkpoint of another model.** LightningCLI replaces the configured model's arguments by those saved in
  the checkpoint, so ``--ckpt_path`` of a ResNet-20 run given to a VGG-11 config trains the ResNet-20, and
  the saved config says so only afterwards. :func:`check_same_model` refuses a checkpoint whose architecture
  (zoo name and widths, or the artifact it started from) is not the configured one.
* **``--ckpt_path last`` after a kill.** Lightning looks for ``last.ckpt`` in the checkpoint folder of the
  *new* run, and every run gets a new logger version folder, so it warns and trains from scratch.
  :func:`resolve_last` finds the newest ``last.ckpt`` the configured logger (or ``checkpoint.dirpath``) has
  written, resumes from it and keeps logging to its run (the same logger version), or fails saying where it
  looked.

The resume command is the training command plus ``--ckpt_path last``::

    python train.py fit --config configs/cifar/l1_resnet56.yaml --ckpt_path last
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: the checkpoint hyper-parameters that name the architecture (ImageClassifier.on_save_checkpoint writes them)
_ARCH_KEYS = ("arch", "cfg", "model_kwargs")


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    try:
        value = ns[key] if not hasattr(ns, "get") else ns.get(key, default)
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def _widths(arch: str, cfg: Any, model_kwargs: Any) -> dict[str, Any]:
    """The architecture a zoo ``arch`` with these arguments has (built on the meta device: shapes only)."""
    import torch

    from lit_prune.models import architecture, create_model

    with torch.device("meta"):
        model = create_model(arch, cfg=cfg, **dict(model_kwargs or {}))
    kwargs = dict(architecture(model)["kwargs"])
    kwargs.pop("num_classes", None)
    return kwargs


def read_hparams(path: str) -> dict[str, Any] | None:
    """The hyper-parameters of a Lightning checkpoint (None for any other file, e.g. an artifact)."""
    from lit_prune.sources import _read_checkpoint

    obj = _read_checkpoint(path)
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) and "state_dict" in obj else None
    return dict(hp) if isinstance(hp, dict) else None


def check_same_model(path: str, model: Any) -> None:
    """Refuse ``path`` when it is a checkpoint of another model than the configured ``model`` section.

    Raises:
        ValueError: the architectures differ (named both), or the configured artifact is not the one the
            checkpoint's run started from.
    """
    hp = read_hparams(path)
    if hp is None or _get(model, "model") is not None:  # not ours, or a user's own network: nothing to compare
        return
    artifact = _get(model, "artifact")
    if artifact is not None:
        started = hp.get("source_artifact") or hp.get("artifact")
        if started is None or Path(started).resolve() != Path(artifact).resolve():
            raise ValueError(f"--ckpt_path {path} is of a run that started from "
                             f"{started or 'no artifact'}, but the config trains the artifact {artifact}; give the "
                             "checkpoint of this run, or drop --ckpt_path to start afresh")
        return
    arch = _get(model, "arch")
    if arch is None or hp.get("arch") is None:
        return
    mine = (arch, _widths(arch, _get(model, "cfg"), _get(model, "model_kwargs")))
    theirs = (hp["arch"], _widths(hp["arch"], hp.get("cfg"), hp.get("model_kwargs")))
    if mine != theirs:
        raise ValueError(f"--ckpt_path {path} holds a {theirs[0]} with {theirs[1]}, but the config trains a "
                         f"{mine[0]} with {mine[1]}: Lightning would silently train the checkpoint's model. Give "
                         "the checkpoint of this model, or the checkpoint's own config (its run folder has "
                         "config.yaml)")


def _logger_dirs(trainer: Any) -> list[tuple[Path, Any]]:
    """``(run parent folder, logger init_args)`` of each configured TensorBoard/CSV logger."""
    loggers = _get(trainer, "logger")
    root = Path(_get(trainer, "default_root_dir", "."))
    if loggers is True or loggers is None:  # Lightning's default logger: <default_root_dir>/lightning_logs
        return [(root / "lightning_logs", None)]
    if loggers is False:
        return []
    found = []
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        args = _get(lg, "init_args")
        if args is not None and _get(args, "save_dir") is not None:
            found.append((Path(_get(args, "save_dir")) / str(_get(args, "name", "lightning_logs")), args))
    return found


def resolve_last(section: Any) -> None:
    """Turn ``ckpt_path: last`` of a ``fit`` config section into the newest ``last.ckpt`` of its runs.

    Sets ``ckpt_path`` to that file and the logger's ``version`` to that run's, so that the resumed run
    writes to the same folder and TensorBoard run.

    Raises:
        FileNotFoundError: no ``last.ckpt`` where this config's runs write their checkpoints.
    """
    dirpath = _get(section.get("checkpoint"), "dirpath")
    if dirpath is not None:
        last = Path(dirpath) / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"--ckpt_path last: no {last} to resume from; train without --ckpt_path first")
        section["ckpt_path"] = str(last)
        return
    looked, candidates = [], []
    for parent, args in _logger_dirs(section.get("trainer")):
        looked.append(str(parent))
        version = _get(args, "version")
        pattern = f"{version}/checkpoints/last.ckpt" if version is not None else "*/checkpoints/last.ckpt"
        candidates += [(p.stat().st_mtime, p, args) for p in parent.glob(pattern)]
    if not candidates:
        where = ", ".join(f"{d}/*/checkpoints/" for d in looked) or "nowhere (no logger and no checkpoint.dirpath)"
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt of an earlier run of this config in {where}; "
                                "train without --ckpt_path first, or give the checkpoint's path")
    _, last, args = max(candidates, key=lambda c: c[0])
    section["ckpt_path"] = str(last)
    version = last.parent.parent.name
    if args is not None and _get(args, "version") is None:
        args["version"] = version  # log to the resumed run, not to a new version folder
    print(f"resuming from {last} (run {version})", file=sys.stderr)
