"""Atomic file writes: a crash never leaves a half-written file, and an existing file stays intact until the
new one is complete (temporary file beside the target, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it into place.

    A crash never leaves a half-written file, and an existing file at ``path`` stays intact until the
    new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
