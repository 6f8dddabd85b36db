"""``python -m lit_prune.prune``: prune a trained model into an artifact with a one-shot method.

The command is :mod:`lit_prune.cli.prune` (its usage is there and in ``--help``); the functions it calls
(loading the method, the datamodule, the large model; predefined architectures) are :mod:`lit_prune.sources`.
"""

import sys

from lit_prune.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
