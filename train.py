"""Train, validate or test any lit-prune model: ``python train.py fit --config configs/...``.

The command is :mod:`lit_prune.cli.train` (lit-prune's LightningCLI).
"""

import sys

from lit_prune.cli.train import run

if __name__ == "__main__":
    sys.exit(run())
