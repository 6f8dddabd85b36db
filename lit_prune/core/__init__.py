"""Plain-PyTorch pruning machinery (no Lightning import): counting, init, masks, surgery, budgets.

Import the modules themselves (``lit_prune.core.flops``, ``lit_prune.core.budget``, ...): this package
imports none of them, so that a light one (the Scratch-B budget, the LR schedule) does not load torch.
"""
