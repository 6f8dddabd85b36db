"""Atomic file writes: a crash never leaves a half-written file, and an existing file stays intact until the
new one is complete (temporary file beside the target, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


class UnwritablePath(ValueError):
    """An output path that cannot be written (a directory, under a file, read-only): bad input, said plainly."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it into place.

    A crash never leaves a half-written file, and an existing file at ``path`` stays intact until the
    new one is complete.

    Raises:
        UnwritablePath: ``path`` is a directory, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise UnwritablePath(f"cannot write {path}: it is a directory; give a file name, e.g. {path / 'out.pt'}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UnwritablePath(f"cannot write {path}: {blocking} is a file, not a folder; choose another output path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UnwritablePath(f"cannot write {path}: cannot create a file in {path.parent} ({err.strerror or err}); "
                             "choose a writable output path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions of a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    import torch  # here, so that writing JSON does not import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | os.PathLike, what: str = "checkpoint", fix: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file and what is wrong
    (``what`` names the kind of file, ``fix`` is appended to the message of an unreadable one).

    Raises:
        FileNotFoundError: no file at ``path`` (or a directory).
        ValueError: an empty file, or one that is not a readable torch file of plain data (truncated,
            another format, or holding code that ``weights_only`` refuses to run).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} at {path}" + (" (a directory)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): a run killed while writing it? Use an earlier {what}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding code that weights_only refuses
        import pickle
        import zipfile

        if not zipfile.is_zipfile(p):
            why = "not a file written by torch.save, or a truncated one"
        elif isinstance(err, pickle.UnpicklingError):  # torch's text would suggest weights_only=False: never
            why = "it holds objects other than tensors and plain data: no code is run from a data file"
        else:
            why = f"{type(err).__name__}: {str(err)[:200]}"
        raise ValueError(f"{path} is not a readable {what} ({why})" + (f"; {fix}" if fix else "")) from err


def atomic_save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
