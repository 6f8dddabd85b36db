"""``python train.py``: the LightningCLI of lit-prune (fit, validate, test, predict)."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from pathlib import Path

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import lit_prune.callbacks  # noqa: F401  imported so that --help lists our callbacks and datamodules as choices
import lit_prune.datamodules  # noqa: F401
from lit_prune.callbacks.progress import EpochProgress
from lit_prune.module import ImageClassifier

#: where ``--help`` lists the known subclasses of a type, those of these packages are kept and named first
_LISTED = ("lit_prune.", "pytorch_lightning.", "torchvision.models.", "timm.")
_SUBCLASSES = ", known subclasses: "


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help with short lists of choices.

    Where an option takes a class, jsonargparse lists every imported subclass of its type: for
    ``--model.model`` (an ``nn.Module``) that is every ``torch.nn`` layer, about 700 lines, which the help
    replaces by one line. Other lists keep the classes of our package first, then those of Lightning,
    torchvision and timm, and say how many others they leave out (any importable class path is accepted).
    """

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        start = text.find(_SUBCLASSES)
        if start < 0:
            return text
        end = text.find(")", start)
        paths = [p.strip() for p in text[start + len(_SUBCLASSES):end].split(",")]
        if any(p.startswith("torch.nn.") for p in paths):  # any network: the list would be every layer there is
            return f"{text[:start]}, any torch.nn.Module class path, e.g. torchvision.models.ResNet{text[end:]}"
        listed = sorted((p for p in paths if p.startswith(_LISTED)), key=lambda p: (not p.startswith("lit_prune."), p))
        other = len(paths) - len(listed)
        more = f"{', ' if listed else ''}and {other} others" if other else ""
        return f"{text[:start]}{_SUBCLASSES if listed else ', any subclass'}{', '.join(listed)}{more}{text[end:]}"


class LRMonitor(LearningRateMonitor):
    """LearningRateMonitor that stays quiet, instead of failing, when a run has no logger."""

    def on_train_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


_UNION_OPTION = re.compile(r'Parser key "(?P<key>[^"]+)":.*?class_path \'(?P<cls>[^\']+)\':'
                           r'\s*Option \'(?P<opt>[^\']+)\' is not accepted', re.S)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)")
_NOT_ACCEPTED = re.compile(r"does not accept option '(?P<key>[^']+)'")


def _init_params(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def plain_error(message: str, options: list[str]) -> str:
    """jsonargparse's message for a misspelt option, said in one line with the closest correct spelling.

    A misspelt argument of a class given by ``class_path`` (``--data.rot``, or ``rot:`` under ``data.init_args``
    in a YAML file) is reported as a dump of every Union alternative that failed; an unknown top-level
    option names no alternative. ``options`` are the parser's option strings.
    """
    m = _UNION_OPTION.search(message)
    if m:
        key, cls, opt = m["key"], m["cls"], m["opt"]
        params = _init_params(cls)
        close = difflib.get_close_matches(opt, params, n=1, cutoff=0.8)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        known = f" Its options: {', '.join(params)}." if params else ""
        return f"--{key}.{opt}: {cls} has no option '{opt}'{hint}{known}"
    m = _NOT_ACCEPTED.search(message)  # a misspelt key in a YAML file
    if m:
        close = difflib.get_close_matches(f"--{m['key']}", options, n=1, cutoff=0.8)
        return message + (f"; did you mean '{close[0].removeprefix('--')}'?" if close else "")
    m = _UNRECOGNIZED.match(message)
    if m:
        flags = [a.split("=", 1)[0] for a in m["args"].split() if a.startswith("--")]
        close = {f: difflib.get_close_matches(f, options, n=1, cutoff=0.8) for f in flags}
        hints = [f"'{f}': did you mean '{c[0]}'?" for f, c in close.items() if c]
        return message + (f" ({'; '.join(hints)})" if hints else "")
    return message


class LitPruneParser(LightningArgumentParser):
    """Lightning's parser, with misspelt options reported in one line with the closest correct spelling,
    after the first line of the usage instead of all of it (60 lines for ``fit``)."""

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        if not self.exit_on_error:
            return super().error(message, ex)
        options = [o for a in parser._actions for o in a.option_strings]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {plain_error(message, options)}\n(all options: {prog} --help)\n")
        self.exit(2)


class LitPruneCLI(LightningCLI):
    """LightningCLI with the standard callbacks kept out of ``trainer.callbacks``.

    Checkpointing, LR monitoring and the per-epoch progress line are their own config groups (``checkpoint``,
    ``lr_monitor``, ``progress``), so a method config that sets ``trainer.callbacks`` cannot erase them by
    replacing the list.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "epoch{epoch:03d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})
        parser.add_lightning_class_args(EpochProgress, "progress")  # one line per epoch, in logs and the runner
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


    def _parse_ckpt_path(self) -> None:
        from lit_prune.cli.resume import check_same_model, resolve_last

        section = self.config.get(self.config.get("subcommand") or "", None)
        path = section.get("ckpt_path") if section is not None else None
        if path == "last" and self.config.get("subcommand") == "fit":
            resolve_last(section)
            path = section["ckpt_path"]
        if path and Path(path).is_file():
            check_same_model(path, section.get("model"))
        super()._parse_ckpt_path()


def main(args: list[str] | None = None, run: bool = True) -> LitPruneCLI:
    """The CLI on ``args`` (None: ``sys.argv``); ``run=False`` only parses and builds (no subcommand in ``args``)."""
    return LitPruneCLI(
        ImageClassifier,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"formatter_class": HelpFormatter},
        parser_class=LitPruneParser,
        run=run,
    )


#: the toolkit's own errors: each says what is wrong and what to do, so the traceback only hides the message
CLEAR_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, KeyError)


def run(args: list[str] | None = None) -> int:
    """``python train.py``: :func:`main`, with the toolkit's clear errors printed as one line (exit 2).

    ``LIT_PRUNE_TRACEBACK=1`` shows the traceback instead.
    """
    try:
        main(args)
    except CLEAR_ERRORS as err:
        if os.environ.get("LIT_PRUNE_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        print(f"error: {message}\n(LIT_PRUNE_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
    return 0
