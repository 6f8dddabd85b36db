"""The command-line tools of lit-prune: argument parsing and ``main`` of every command, nothing else.

    train.py   python train.py fit|validate|test|predict (the LightningCLI: :class:`LitPruneCLI`)
    prune.py   python -m lit_prune.prune (a trained model -> a pruned artifact; a predefined architecture)
    flops.py   python -m lit_prune.flops (MACs and parameters of a zoo model or an artifact)

The runner's commands live with the runner: ``python -m lit_prune.rethink`` is
:mod:`lit_prune.protocol.cli` and ``python -m lit_prune.stage`` is :mod:`lit_prune.protocol.stage`. The public
commands stay ``python -m lit_prune.<command>``: the top-level modules ``lit_prune/{flops,prune,rethink,stage}.py``
only import the ``main`` of their implementation. What a command does lives in the library (the counter in
:mod:`lit_prune.core.flops`, loading methods, datamodules and large models in :mod:`lit_prune.sources`).

Importing this package imports neither Lightning nor torch, so a command's ``--help`` can stay cheap.
"""
