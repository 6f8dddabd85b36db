"""``python -m lit_prune.stage``: one stage of a protocol (fit, test, metrics, artifact).

The implementation is :mod:`lit_prune.protocol.stage`; Lightning's DDP launcher re-executes this command
on every rank.
"""

from lit_prune.protocol.stage import METRICS, StageTimer, load_weights_into, main, run_stage

__all__ = ["METRICS", "StageTimer", "load_weights_into", "main", "run_stage"]

if __name__ == "__main__":
    main()
