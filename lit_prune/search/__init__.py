"""Pruning as architecture search (Liu et al., ICLR 2019, Section 5): the controls and the searches that test
whether the widths a pruning method finds are what matter.

    uniform.py   the uniformly pruned model with a method's parameter count or FLOPs (Figure 3's baseline):
                 one width multiplier over the groups the method could prune, or one sparsity for every
                 masked layer, found by bisection
    random_control.py  the random-selection control: a method's widths (per-layer sparsities), channels (weights)
                 chosen at random, to be fine-tuned as the method's artifact is
    guided.py    guided pruning and guided sparsification (Figure 5 as we read it): the mean kept ratio per stage
                 (per stage and 3x3 kernel position) of a method's artifacts, applied to a new model, the same
                 or another one (transferred)
    stages.py    stages: layers of the same feature-map size
    cli.py       python -m lit_prune.search {uniform,random,guided}: the prune stage of such a runner variant

Every function takes plain modules and artifacts (:mod:`lit_prune.artifact`) and returns an artifact, so the
runner's stages train the result as any other. Importing this package imports nothing heavy.
"""
