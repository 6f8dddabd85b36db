"""``python -m lit_prune.flops``: the multiply-accumulates and parameters of a zoo model or an artifact.

The command is :mod:`lit_prune.cli.flops` (its usage is there and in ``--help``); the counter is
:mod:`lit_prune.core.flops`.
"""

import sys

from lit_prune.cli.flops import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
