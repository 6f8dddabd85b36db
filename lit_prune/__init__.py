"""lit-prune: the experiments of "Rethinking the Value of Network Pruning" as a Lightning toolkit."""

__version__ = "0.1.0"
