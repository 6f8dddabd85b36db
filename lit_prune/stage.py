"""``python -m lit_prune.stage``: one stage of a protocol (fit, test, metrics, artifact).

The implementation is :mod:`lit_prune.protocol.stage`; Lightning's DDP launcher re-executes this command
on every rank. ``--help`` prints the usage without loading torch or Lightning.
"""

import sys

USAGE = """usage: python -m lit_prune.stage --stage_dir DIR [--weights PATH] [train.py fit arguments]

One stage of a protocol: fit (resuming from DIR/checkpoints/last.ckpt after a kill), test the final-epoch
model, write DIR/metrics.json and export the trained model as an artifact. --weights loads a Lightning
checkpoint or a plain state dict into the model first; every other argument is a train.py fit argument
(--trainer.max_epochs 0 only tests). The protocol runner (python -m lit_prune.rethink) writes these commands;
run one by hand to retry a stage."""

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(USAGE)
        sys.exit(0)
    from lit_prune.protocol.stage import main

    main()
