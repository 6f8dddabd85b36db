"""Pruning methods as Lightning callbacks, under the design card's top-level name.

The classes live in :mod:`lit_prune.callbacks`; this package re-exports them so that both class paths work
in YAML (``callbacks.L1FilterPruning`` and ``lit_prune.callbacks.L1FilterPruning``). A file named
``callbacks.py`` in the working directory shadows this package, never ``lit_prune.callbacks``.
"""

from lit_prune.callbacks import *  # noqa: F403
from lit_prune.callbacks import __all__  # noqa: F401
