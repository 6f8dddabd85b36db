"""The LightningDataModules of lit-prune, under the design card's top-level name.

The classes live in :mod:`lit_prune.datamodules`; this package re-exports them so that both class paths
work in YAML (``datamodules.CIFARDataModule`` and ``lit_prune.datamodules.CIFARDataModule``).
"""

from lit_prune.datamodules import *  # noqa: F403
from lit_prune.datamodules import __all__  # noqa: F401
