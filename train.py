"""Train, validate or test any lit-prune model: ``python train.py fit --config configs/...``.

The command is :mod:`lit_prune.cli.train` (lit-prune's LightningCLI).
"""

from lit_prune.cli.train import main

if __name__ == "__main__":
    main()
