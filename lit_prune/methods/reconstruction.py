"""The shared driver of the data-driven, layer-by-layer reconstruction methods (ThiNet, He et al.'s channel
pruning), in plain PyTorch; the Lightning callbacks are in :mod:`lit_prune.callbacks.reconstruction`.

Both methods walk the model's channel groups from shallow to deep. For each group they collect statistics
of its consumer on training images from the *current* network (the layers before are already pruned and
refitted), choose the channels, write the consumer's refitted weights and remove the channels physically
(:mod:`lit_prune.core.reconstruct`). A zoo model is left as it is: the work happens on a deep copy whose final
state is the artifact. A model outside the zoo cannot be written as an artifact, so it is pruned in place.

Data: the first ``num_images`` images of a seeded permutation of the training set (the trainer's train
dataloader at the end of training, or the prune CLI's ``--data-config``), in batches of ``batch_size``.
Under DDP each rank takes every world_size-th of those images, sums its statistics, and an all-reduce
(``strategy.reduce``, sum) gives every rank the same statistics; rank 0's decision is broadcast anyway.
While a layer's statistics are collected, rank 0 logs its progress every ``progress_seconds`` (10 s), and
one line per layer gives the decision and its reconstruction errors.

Optional fine-tuning between layers (ThiNet fine-tunes briefly after each layer, docs/paper-settings.md §4.2 step 5):
with ``finetune_steps > 0`` the copy takes that many SGD steps (momentum 0.9, cross-entropy on the training
labels) after each pruned layer, before the next layer's statistics are collected. BatchNorm layers keep
their running statistics during these steps (as in fine-tuning with frozen statistics), and under DDP
each rank reads its own share of every batch and the gradients are averaged across ranks, so every rank
keeps the same weights.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from lit_prune.core.groups import ChannelGroup, channel_groups, group_size
from lit_prune.core.protocols import is_zoo_model
from lit_prune.core.reconstruct import Reconstruction, ReduceFn, apply_reconstruction, consumer_of
from lit_prune.core.selection import check_patterns, matches_any
from lit_prune.core.surgery import compact_blocks, prune_group
from lit_prune.methods.base import Context, Decision, PruningMethod
from lit_prune.methods.plan import WidthPlan

log = logging.getLogger(__name__)


def _positive_int(value: Any, name: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{hint}, got {value!r}")
    return value


class _Progress:
    """Iterates a loader, logging on rank 0 how many of this rank's images have been read (at most every
    ``every`` seconds), so that a layer whose statistics take minutes shows that it is moving."""

    def __init__(self, loader: DataLoader, label: str, every: float, rank: int) -> None:
        self.loader, self.label, self.every, self.rank = loader, label, every, rank
        self.total = len(loader.dataset)

    def __iter__(self) -> Any:
        seen, start = 0, time.monotonic()
        last = start
        for batch in self.loader:
            yield batch
            seen += len(batch[0] if isinstance(batch, (list, tuple)) else batch)
            now = time.monotonic()
            if now - last >= self.every and seen < self.total:
                if self.rank == 0:
                    log.info("%s: %d/%d images (%.0f%%), %.0f s", self.label, seen, self.total, 100 * seen / self.total,
                             now - start)
                last = now


class LayerwiseReconstruction(PruningMethod):
    """Base of :class:`~lit_prune.methods.thinet.ThiNetReconstruction` and
    :class:`~lit_prune.methods.channel_pruning.RegressionReconstruction` (the module docstring says how).

    Subclasses implement :meth:`reconstruct_group` (one group's decision) and may override
    :meth:`reference` (a frozen copy of the unpruned network for the targets).

    Arguments: those of :class:`lit_prune.callbacks.reconstruction.ReconstructionPruning`, which documents
    them for YAML (``target`` or ``prune_ratio``, ``layers``, ``skip``, ``num_images``, ...).

    Exactly one of ``target`` and ``prune_ratio`` is given.
    """

    needs_data = True
    #: seconds between progress lines while one layer's statistics are being collected
    progress_seconds = 10.0

    def __init__(
        self,
        target: str | None = None,
        prune_ratio: float | dict[str, float] | None = None,
        layers: list[str] | None = None,
        skip: list[str] | None = None,
        num_images: int = 5000,
        positions_per_image: int = 10,
        seed: int = 0,
        batch_size: int | None = None,
        ridge: float = 1e-4,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        finetune_weight_decay: float = 1e-4,
        round_to: int = 1,
    ) -> None:
        self.widths = WidthPlan(target=target, prune_ratio=prune_ratio, skip=list(skip or []), round_to=round_to)
        _positive_int(num_images, "num_images", " (training images sampled)")
        _positive_int(positions_per_image, "positions_per_image", " (the papers use 10)")
        if batch_size is not None:
            _positive_int(batch_size, "batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0:
            raise ValueError(f"ridge must be a number >= 0 (relative to the Gram diagonal), got {ridge!r}")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be an int >= 0 (0: no fine-tuning between layers), "
                             f"got {finetune_steps!r}")
        for name, value, low in (("finetune_lr", finetune_lr, 0.0), ("finetune_weight_decay", finetune_weight_decay,
                                                                     None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value == low:
                raise ValueError(f"{name} must be a number {'> 0' if low is not None else '>= 0'}, got {value!r}")
        self.finetune_steps, self.finetune_lr = finetune_steps, float(finetune_lr)
        self.finetune_weight_decay = float(finetune_weight_decay)
        if isinstance(layers, str):
            raise ValueError(f"layers is a list of layer patterns, e.g. [{layers!r}]")
        self.layers = None if layers is None else list(layers)
        self.num_images, self.positions_per_image, self.seed = num_images, positions_per_image, seed
        self.batch_size, self.ridge = batch_size, float(ridge)
        self._results: list[dict[str, Any]] = []
        self._keeps: dict[str, torch.Tensor] = {}

    def decide(self, model: nn.Module, ctx: Context) -> Decision:
        """Prune and refit a copy of a zoo model (a user's model itself), layer by layer.

        Raises:
            ValueError: no data, or a layer/width request that does not fit the model.
        """
        work = self._walk(copy.deepcopy(model) if is_zoo_model(model) else model, ctx)
        return Decision(pruned=work, keeps=dict(self._keeps))

    def _walk(self, work: nn.Module, ctx: Context) -> nn.Module:
        """Prune and refit ``work`` itself, group by group, shallow to deep; returns it."""
        dataloader, rank, world, reduce_fn = ctx.dataloader, ctx.rank, ctx.world_size, ctx.reduce
        if dataloader is None:
            raise ValueError(f"{self.name} needs training images: pass dataloader= (the prune CLI: "
                             "--data-config naming the datamodule)")
        was_training = work.training
        reference = self.reference(work)
        work = self.prepare(work).eval()
        plan = self.plan(work)
        loader = self._sample_loader(dataloader, rank, world)
        self._results, self._keeps = [], {}
        for i, (name, num_keep) in enumerate(plan):
            groups = {g.name: g for g in channel_groups(work)}
            if name not in groups:  # inside a residual branch that vanished earlier in the walk
                continue
            group = groups[name]
            size = group_size(work, group)
            if num_keep == 0:  # the whole branch goes (plan() refused this for a plain chain)
                prune_group(work, group, torch.zeros(size, dtype=torch.bool))
                self._keeps[name] = torch.zeros(size, dtype=torch.bool)
                self._info(rank, f"{self.name}: {name} kept 0/{size} channels: its residual branch is removed")
                continue
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + i * 7919 + rank * 104_729) % 2**63)
            batches = _Progress(loader, f"{self.name}: {name} (layer {i + 1}/{len(plan)})", self.progress_seconds, rank)
            rec = self.reconstruct_group(work, reference, group, num_keep, batches, generator, reduce_fn)
            rec = ctx.broadcast(rec.cpu())  # identical on every rank already; rank 0's for safety
            apply_reconstruction(work, group, rec)
            self._keeps[name] = rec.keep
            losses = self._finetune(work, dataloader, i, rank, world, reduce_fn) if self.finetune_steps else None
            self._record(name, size, rec, losses, rank)
        if any(not k.any() for k in self._keeps.values()):
            compact_blocks(work)  # models whose block names must stay contiguous renumber them (as prune_groups does)
        ctx.log({f"prune/{what}/{r['layer']}": r[what] for r in self._results
                 for what in ("error_removed", "error_reconstructed")})
        return work.train(was_training)

    # ---- extension points ----------------------------------------------------------------------------
    def reconstruct_group(
        self, model: nn.Module, reference: nn.Module | None, group: ChannelGroup, num_keep: int,
        batches: Any, generator: torch.Generator, reduce_fn: ReduceFn | None,
    ) -> Reconstruction:
        """One group's decision on the current network ``model`` (implemented by each method)."""
        raise NotImplementedError

    def reference(self, model: nn.Module) -> nn.Module | None:
        """A frozen copy of the unpruned network that gives the reconstruction targets (None: the current one)."""
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Last changes to the work copy before the walk (channel pruning adds its channel samplers)."""
        return model

    # ---- planning ------------------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> list[tuple[str, int]]:
        """The groups to prune, shallow to deep, with their keep counts (groups left whole are omitted).

        Raises:
            ValueError: a pattern matches no eligible layer, a target is wider than the layer, or a plain
                chain would lose every channel.
        """
        eligible = []
        for g in channel_groups(model):
            try:
                consumer_of(model, g)
            except ValueError:
                continue  # several consumers (a dense stream) or one that cannot be refitted
            eligible.append(g)
        if self.layers is not None:
            check_patterns(self.layers, [g.name for g in eligible], "layers")
        counts = self.widths.counts(model, eligible)
        return [(g.name, counts[g.name]) for g in eligible
                if counts[g.name] < group_size(model, g) and (self.layers is None or matches_any(g.name, self.layers))]

    # ---- fine-tuning between layers ------------------------------------------------------------------
    def _finetune(
        self, model: nn.Module, dataloader: Any, layer: int, rank: int, world: int, reduce_fn: ReduceFn | None
    ) -> tuple[float, float]:
        """``finetune_steps`` SGD steps on the pruned copy; returns rank 0's mean loss of the first and last steps.

        BN keeps its running statistics (eval mode); gradients are averaged across ranks through ``reduce_fn``.
        """
        batch_size = self._batch_size(dataloader)
        total = self._dataset_length(dataloader)
        # a fresh seeded permutation per layer (repeated when the steps need more images than the dataset has)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7 + layer)
        needed = self.finetune_steps * batch_size * world
        order = torch.cat([torch.randperm(total, generator=g) for _ in range(-(-needed // total))])[:needed]
        loader = self._subset_loader(dataloader, order[rank::world].tolist(), batch_size)
        params = [p for p in model.parameters() if p.requires_grad]  # frozen parameters stay frozen
        if not params:
            raise ValueError("finetune_steps > 0 but no parameter of the model requires grad")
        opt = torch.optim.SGD(params, lr=self.finetune_lr, momentum=0.9, weight_decay=self.finetune_weight_decay)
        device = next(iter(params)).device
        losses = []
        model.eval()  # frozen BN statistics: identical on every rank, and no drift from a few small batches
        with torch.enable_grad():
            for batch in loader:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise ValueError("finetune_steps needs (images, labels) batches from the training data")
                loss = F.cross_entropy(model(batch[0].to(device)), batch[1].to(device))
                opt.zero_grad(set_to_none=False)
                loss.backward()
                if reduce_fn is not None:  # what DDP would do: average the gradients of all ranks
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    flat = reduce_fn(torch.cat([gr.flatten() for gr in grads])) / world
                    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                        p.grad = chunk.view_as(p).clone()
                opt.step()
                losses.append(float(loss.detach()))
        model.zero_grad(set_to_none=True)
        k = max(1, len(losses) // 4)
        return sum(losses[:k]) / k, sum(losses[-k:]) / k

    # ---- data ----------------------------------------------------------------------------------------
    def _sample_loader(self, dataloader: Any, rank: int, world: int) -> DataLoader:
        """This rank's share of the first ``num_images`` images of a seeded permutation of the dataset."""
        total = self._dataset_length(dataloader)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[: self.num_images]
        return self._subset_loader(dataloader, order[rank::world].tolist(), self._batch_size(dataloader))

    @staticmethod
    def _unwrap_loader(dataloader: Any) -> Any:
        if isinstance(dataloader, dict):
            return next(iter(dataloader.values()))
        if isinstance(dataloader, (list, tuple)):
            return dataloader[0]
        return dataloader

    def _dataset_length(self, dataloader: Any) -> int:
        dataset = getattr(self._unwrap_loader(dataloader), "dataset", self._unwrap_loader(dataloader))
        try:
            return len(dataset)
        except TypeError:
            raise ValueError(f"{self.name} samples images by index: the training dataset "
                             f"({type(dataset).__name__}) must be a map-style dataset with a length") from None

    def _batch_size(self, dataloader: Any) -> int:
        return self.batch_size or getattr(self._unwrap_loader(dataloader), "batch_size", None) or 64

    def _subset_loader(self, dataloader: Any, indices: list[int], batch_size: int) -> DataLoader:
        """A loader over ``indices`` of the training dataset, in order, with the original collate and workers."""
        dataloader = self._unwrap_loader(dataloader)
        dataset = getattr(dataloader, "dataset", dataloader)
        workers = getattr(dataloader, "num_workers", 0) if isinstance(dataloader, DataLoader) else 0
        kwargs: dict[str, Any] = {"persistent_workers": True} if workers > 0 else {}  # one pass per layer
        if isinstance(dataloader, DataLoader):
            kwargs["collate_fn"] = dataloader.collate_fn
        return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
                          **kwargs)

    # ---- reporting -----------------------------------------------------------------------------------
    @property
    def results(self) -> list[dict[str, Any]]:
        """One entry per pruned layer of the last decision: kept/total, errors, samples."""
        return [dict(r) for r in self._results]

    @staticmethod
    def _info(rank: int, message: str) -> None:
        if rank == 0:
            log.info(message)

    def _record(
        self, name: str, size: int, rec: Reconstruction, losses: tuple[float, float] | None, rank: int
    ) -> None:
        entry: dict[str, Any] = {"layer": name, "kept": int(rec.keep.sum()), "total": size,
                                 "error_removed": rec.error_removed, "error_reconstructed": rec.error_reconstructed,
                                 "samples": rec.samples}
        entry.update({k: float(v) for k, v in rec.lasso.items()})
        extra = f", lasso alpha {rec.lasso['alpha']:.3g} ({int(rec.lasso['nonzero'])} non-zero)" if rec.lasso else ""
        if losses is not None:
            entry["finetune_loss_first"], entry["finetune_loss_last"] = losses
            extra += f"; fine-tuned {self.finetune_steps} steps, loss {losses[0]:.4g} -> {losses[1]:.4g}"
        self._results.append(entry)
        self._info(
            rank,
            f"{self.name}: {name} kept {entry['kept']}/{size} channels; relative reconstruction error "
            f"{rec.error_removed:.4g} removed -> {rec.error_reconstructed:.4g} refitted ({rec.samples} samples{extra})"
        )

