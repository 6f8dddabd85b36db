"""Train, validate or test any lit-prune model: ``python train.py fit --config configs/...``."""

from lit_prune.cli import main

if __name__ == "__main__":
    main()
