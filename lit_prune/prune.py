"""``python -m lit_prune.prune``: prune a trained model into an artifact with a one-shot method.

The command is :mod:`lit_prune.cli.prune` (its usage is there and in ``--help``); the functions it calls
(loading the method, the datamodule, the large model; predefined architectures) are :mod:`lit_prune.sources`.
"""

import sys

from lit_prune.cli.prune import main

# Transition: these lived here before the CLI/library split; new code imports them from lit_prune.sources.
from lit_prune.sources import load_datamodule, load_method, load_source, predefined_artifact

__all__ = ["load_datamodule", "load_method", "load_source", "main", "predefined_artifact"]

if __name__ == "__main__":
    sys.exit(main())
