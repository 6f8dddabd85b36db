"""Plain-PyTorch pruning machinery (no Lightning import): counting, init, masks, surgery, budgets."""

from lit_prune.core.flops import FlopsReport, LayerCount, count_flops, flops_ratio

__all__ = ["FlopsReport", "LayerCount", "count_flops", "flops_ratio"]
