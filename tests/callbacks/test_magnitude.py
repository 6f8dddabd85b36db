"""Unstructured magnitude pruning (docs/paper-settings.md §9.1): exact sparsity, the torch peer, gradual pruning without
compounding, theta_0 and masks across a resume, enforcement through SGD, the masked artifact, and DDP.

Lightning's own ``ModelPruning`` is the peer whose mistakes these tests rule out: it prunes a float ``amount``
of what remains every time it runs (so a schedule compounds), keeps neither masks nor the original weights in
checkpoints, and never broadcasts its decision under DDP.
"""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from callbacks import MagnitudePruning
from lit_prune.artifact import build_model, load_artifact
from lit_prune.core.flops import count_flops
from lit_prune.core.masks import apply_masks
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from tests.helpers import RandomImageDataModule, clean_env, run_process

REPO = Path(__file__).resolve().parents[2]
CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]  # narrow ResNet-20: 67,248 conv weights (a multiple of 4), fc 640


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cifar_resnet20", cfg=CFG20, num_classes=10)


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def _distinct(weights: list[torch.Tensor], seed: int = 0) -> None:
    """Give the weights the magnitudes 1..N (exact in float32) in a random order, with random signs."""
    g = torch.Generator().manual_seed(seed)
    n = sum(w.numel() for w in weights)
    mags = torch.randperm(n, generator=g).float() + 1
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    flat = mags * signs
    i = 0
    for w in weights:
        w.copy_(flat[i: i + w.numel()].view_as(w))
        i += w.numel()


def _pruned(masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks.values())


def _leaked(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Non-zero weights where a mask says zero."""
    params = dict(model.named_parameters())
    return sum(int(params[n].detach()[~m.expand_as(params[n])].count_nonzero()) for n, m in masks.items())


def _conv_sparsity(model: nn.Module) -> float:
    ws = [m.weight.detach() for m in _convs(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _trainer(root: Path, cb: pl.Callback | None, max_epochs: int, **kw) -> pl.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "limit_val_batches": 1, **kw}
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=root,
                      callbacks=[cb] if cb is not None else [], enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _module(seed: int = 0, **kw) -> ImageClassifier:
    pl.seed_everything(seed)
    return ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1, **kw)


# ---- exact sparsity ------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.8, 1.5e-5])  # 1.5e-5 * 67,248 = 1.0: only the smallest goes
def test_global_threshold_removes_exactly_int_n_amount_of_the_smallest(amount: float) -> None:
    model = _model()
    convs = _convs(model)
    _distinct([m.weight for m in convs.values()])
    masks = MagnitudePruning(amount=amount).pruner.compute_masks(model, amount)
    assert set(masks) == {f"{n}.weight" for n in convs}  # every conv (stem, blocks), not the classifier
    n = sum(m.weight.numel() for m in convs.values())
    k = int(n * amount)
    assert _pruned(masks) == k
    # they are the k smallest magnitudes: every pruned |w| is below every kept |w|
    params = dict(model.named_parameters())
    pruned = torch.cat([params[p].detach().abs()[~m].flatten() for p, m in masks.items()])
    kept = torch.cat([params[p].detach().abs()[m].flatten() for p, m in masks.items()])
    assert pruned.max() < kept.min()
    # one threshold over all layers: the layers end up with different sparsities
    per_layer = [1 - m.float().mean().item() for m in masks.values()]
    if amount > 0.01:
        assert max(per_layer) - min(per_layer) > 0.01


def test_ties_at_the_threshold_are_all_pruned() -> None:
    """The paper keeps a weight iff |w| > thr: every weight tied with the threshold goes, so more than k may."""
    model = _model()
    weights = [m.weight for m in _convs(model).values()]
    _distinct(weights)
    n = sum(w.numel() for w in weights)
    k = int(n * 0.5)
    with torch.no_grad():  # the magnitudes ranked k-3 .. k+4 (1-based) all become the k-th: 8 tied weights
        for w in weights:
            tie = (w.abs() >= k - 3) & (w.abs() <= k + 4)
            w[tie] = torch.sign(w[tie]) * k
    tied = sum(int((w.abs() == k).sum()) for w in weights)
    assert tied == 8
    masks = MagnitudePruning(amount=0.5).pruner.compute_masks(model, 0.5)
    assert _pruned(masks) == k + 4  # the k - 4 below the tie and all 8 tied ones
    params = dict(model.named_parameters())
    assert all(not params[p].detach()[m].abs().eq(k).any() for p, m in masks.items())


def test_layer_scope_prunes_each_layer_by_its_own_fraction() -> None:
    model = _model()
    convs = _convs(model)
    _distinct([m.weight for m in convs.values()])
    with torch.no_grad():
        convs["layer3.2.conv2"].weight.mul_(1e4)  # far larger than every other weight
    layer = MagnitudePruning(amount=0.6, scope="layer").pruner.compute_masks(model, 0.6)
    for name, conv in convs.items():
        assert int((~layer[f"{name}.weight"]).sum()) == int(conv.weight.numel() * 0.6), name
    # a global threshold leaves the large layer whole: that is the difference
    glob = MagnitudePruning(amount=0.6).pruner.compute_masks(model, 0.6)
    assert glob["layer3.2.conv2.weight"].all()


def test_include_linear_adds_the_classifier_to_the_threshold() -> None:
    model = _model()
    weights = [m.weight for m in _convs(model).values()] + [model.fc.weight]
    _distinct(weights)
    convs_only = MagnitudePruning(amount=0.5).pruner.compute_masks(model, 0.5)
    assert "fc.weight" not in convs_only
    masks = MagnitudePruning(amount=0.5, include_linear=True).pruner.compute_masks(model, 0.5)
    assert "fc.weight" in masks and not masks["fc.weight"].all()
    assert _pruned(masks) == int(sum(w.numel() for w in weights) * 0.5)
    # a model without any conv cannot be pruned by the paper's rule
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no conv layer to prune"):
        MagnitudePruning().pruner.compute_masks(mlp, 0.5)
    assert "0.weight" in MagnitudePruning(include_linear=True).pruner.compute_masks(mlp, 0.5)


def test_relative_rounds_prune_half_of_the_remaining_weights() -> None:
    """Two lottery-ticket rounds of 50% of the remaining weights: 75% in all, the first round's zeros kept."""
    model = _model()
    _distinct([m.weight for m in _convs(model).values()])
    n = sum(m.weight.numel() for m in _convs(model).values())
    cb = MagnitudePruning(amount=0.5, relative=True)
    first = cb.pruner.compute_masks(model, 0.5)
    assert _pruned(first) == n // 2
    apply_masks(model, first)  # the retrained ticket: zeros where the first round pruned
    with torch.no_grad():  # retraining changes the kept weights: make some of them the smallest survivors
        for m in _convs(model).values():
            m.weight.mul_(torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    second = cb.pruner.compute_masks(model, 0.5)
    assert _pruned(second) == n // 2 + (n - n // 2) // 2 == 3 * n // 4
    assert all(not (second[k] & ~first[k]).any() for k in first)  # nothing pruned comes back
    # an absolute target of 0.5 on the same weights would prune nothing more: why rounds are relative
    assert _pruned(MagnitudePruning(amount=0.5).pruner.compute_masks(model, 0.5)) == n // 2


def test_global_masks_equal_torch_global_unstructured() -> None:
    """Peer check against ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=k)``.

    With distinct magnitudes both remove exactly the k smallest. They differ only on ties at the threshold:
    torch keeps exactly k (``topk`` breaks the tie arbitrarily), the paper's ``|w| > thr`` prunes all tied ones.
    """
    model = _model()
    _distinct([m.weight for m in _convs(model).values()], seed=3)
    peer = copy.deepcopy(model)
    n = sum(m.weight.numel() for m in _convs(model).values())
    for amount in (0.3, 0.8):
        k = int(n * amount)
        ours = MagnitudePruning(amount=amount).pruner.compute_masks(model, amount)
        theirs_model = copy.deepcopy(peer)
        params = [(m, "weight") for m in _convs(theirs_model).values()]
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=k)
        theirs = {f"{name}.weight": m.weight_mask.bool() for name, m in _convs(theirs_model).items()}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[p], theirs[p]) for p in ours), amount


# ---- gradual pruning does not compound -----------------------------------------------------------


def test_cubic_schedule_targets_are_cumulative() -> None:
    cb = MagnitudePruning(amount=0.8, start_epoch=2, end_epoch=6, frequency=2)
    targets = {e: cb.pruner.target_sparsity(e) for e in range(9)}
    # Zhu & Gupta: s(t) = 0.8 * (1 - (1 - t)^3), t = (epoch - 2) / 4, every second epoch, always at the end
    assert targets == {0: None, 1: None, 2: 0.0, 3: None, 4: pytest.approx(0.8 * (1 - 0.5**3)), 5: None,
                       6: pytest.approx(0.8), 7: None, 8: None}
    assert MagnitudePruning(amount=0.5, start_epoch=1, end_epoch=1).pruner.target_sparsity(1) == 0.5
    assert MagnitudePruning(amount=0.5).pruner.target_sparsity(0) is None  # one-shot: no epoch prunes


class SparsityProbe(MagnitudePruning):
    """Records the live conv sparsity after each epoch's prune, and whether masked gradients were non-zero."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.history: list[tuple[int, float, float]] = []
        self.masked_grad_seen = False
        self.at_train_start: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.at_train_start = {"masks": dict(self.masks), "leaked": _leaked(pl_module.model, self.masks)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.history.append((trainer.current_epoch, self.current_sparsity, _conv_sparsity(pl_module.model)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = dict(pl_module.model.named_parameters())
        for n, m in self.masks.items():
            g = params[n].grad
            self.masked_grad_seen |= g is not None and bool((g[~m] != 0).any())
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def test_gradual_pruning_reaches_the_target_without_compounding(tmp_path: Path, tiny_data) -> None:
    module = _module()
    n = sum(m.weight.numel() for m in _convs(module.model).values())
    cb = SparsityProbe(amount=0.5, start_epoch=0, end_epoch=2, artifact_path=None)
    _trainer(tmp_path, cb, max_epochs=3).fit(module, datamodule=tiny_data)
    s1 = 0.5 * (1 - 0.5**3)  # 0.4375 after epoch 1; epoch 0 is the ramp's start (target 0)
    assert [(e, t) for e, t, _ in cb.history] == [(0, 0.0), (1, pytest.approx(s1)), (2, pytest.approx(0.5))]
    assert cb.history[0][2] == 0.0
    assert cb.history[1][2] == int(n * s1) / n
    assert cb.history[2][2] == int(n * 0.5) / n  # exactly the target, not 1 - (1 - s1)(1 - s2) = 0.72

    # Contrast: what ModelPruning does with a float amount each epoch (torch.nn.utils.prune on the
    # already-pruned weights) prunes s of what remains, so the same two targets compound.
    peer = _model()
    params = [(m, "weight") for m in _convs(peer).values()]
    for s in (s1, 0.5):
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=s)
    assert _conv_sparsity(peer) == pytest.approx(1 - (1 - s1) * (1 - 0.5), abs=1e-4)


def test_masked_weights_stay_exactly_zero_through_sgd(tmp_path: Path) -> None:
    """Prune after epoch 0, then 20 SGD steps with momentum 0.9 and weight decay: no masked weight moves."""
    module = _module(weight_decay=5e-4)
    cb = SparsityProbe(amount=0.6, start_epoch=0, end_epoch=0, artifact_path=None)
    data = RandomImageDataModule(num_samples=160, batch_size=16)
    trainer = _trainer(tmp_path, cb, max_epochs=3)
    trainer.fit(module, datamodule=data)
    assert cb.history[0][1] == 0.6 and trainer.global_step == 30
    assert cb.masked_grad_seen  # the gradients would revive them: enforcement is what keeps them at zero
    assert _leaked(module.model, cb.masks) == 0
    assert _conv_sparsity(module.model) == pytest.approx(0.6, abs=1e-4)
    opt = trainer.optimizers[0]
    params = dict(module.model.named_parameters())
    for name, m in cb.masks.items():
        p = params[name]
        assert opt.param_groups[0]["momentum"] == 0.9
        assert not opt.state[p]["momentum_buffer"][~m].any(), name  # momentum zero where masked
        assert p.detach()[m].count_nonzero() == int(m.sum()), name  # kept weights still live


# ---- checkpoints and resume ----------------------------------------------------------------------


def test_resume_keeps_theta0_masks_and_schedule(tmp_path: Path, tiny_data) -> None:
    """Fit 2 epochs (gradual, keep_init), checkpoint, resume into a fresh callback and a freshly seeded module."""
    module = _module(seed=0)
    theta0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    first = SparsityProbe(amount=0.5, start_epoch=0, end_epoch=2, keep_init=True)
    trainer = _trainer(tmp_path / "a", first, max_epochs=2)
    trainer.fit(module, datamodule=tiny_data)
    assert first.init_state.keys() == theta0.keys()
    assert all(torch.equal(first.init_state[k], v) for k, v in theta0.items())
    ckpt = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    state = saved["callbacks"][first.state_key]
    assert state["schedule"]["current_sparsity"] == pytest.approx(0.4375)
    assert all(torch.equal(state["masks"][k], m) for k, m in first.masks.items())

    second = SparsityProbe(amount=0.5, start_epoch=0, end_epoch=2, keep_init=True)
    resumed = _module(seed=1)  # its own init differs from theta_0
    assert not torch.equal(resumed.model.conv1.weight, theta0["conv1.weight"])
    trainer2 = _trainer(tmp_path / "b", second, max_epochs=3)
    trainer2.fit(resumed, datamodule=tiny_data, ckpt_path=ckpt)

    # theta_0 is the original initialisation, not the weights at resume (what a fresh on_fit_start would take)
    assert all(torch.equal(second.init_state[k], v) for k, v in theta0.items())
    weights_at_resume = saved["state_dict"]["model.conv1.weight"]
    assert not torch.equal(second.init_state["conv1.weight"], weights_at_resume)
    # the gradual masks came back before the first resumed step, and were enforced from it on
    restored = second.at_train_start
    assert restored["masks"].keys() == first.masks.keys()
    assert all(torch.equal(restored["masks"][k], m) for k, m in first.masks.items())
    assert restored["leaked"] == 0
    # the schedule went on from 0.4375 to 0.5 (cumulative), keeping every restored zero
    assert [(e, t) for e, t, _ in second.history] == [(2, pytest.approx(0.5))]
    assert all(not (second.masks[k] & ~m).any() for k, m in first.masks.items())
    assert _leaked(resumed.model, second.masks) == 0
    # the artifact written at the end carries the true theta_0
    art = load_artifact(second.written)
    assert all(torch.equal(art.init_state[k], v) for k, v in theta0.items())


# ---- the artifact --------------------------------------------------------------------------------


def test_one_shot_artifact_is_masked_full_size_and_leaves_the_live_model(tmp_path: Path, tiny_data) -> None:
    module = _module()
    theta0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = MagnitudePruning(amount=0.75, scope="layer", keep_init=True)
    trainer = _trainer(tmp_path, cb, max_epochs=1)
    trainer.fit(module, datamodule=tiny_data)
    live = module.model
    path = Path(trainer.log_dir) / "pruned.pt"
    assert cb.written == str(path)
    art = load_artifact(path)

    # full size, every conv masked, weights zero exactly where masked and the trained values elsewhere
    assert art.architecture.to_dict() == {"name": "cifar_resnet20", "kwargs": {"cfg": CFG20, "num_classes": 10}}
    assert set(art.masks) == {f"{n}.weight" for n in _convs(live)}
    state = live.state_dict()
    for name, m in art.masks.items():
        w = art.state_dict[name]
        assert w.shape == state[name].shape and m.shape == w.shape
        assert not w[~m].any() and torch.equal(w[m], state[name][m]), name
    assert art.provenance.method == "magnitude" and art.provenance.settings["amount"] == 0.75
    # the live model was not pruned: the stage's own test accuracy is the unpruned model's
    assert _conv_sparsity(live) == 0.0
    assert all(torch.equal(cb.masks[k], m) for k, m in art.masks.items())

    # FLOPs: dense counts every weight, pruned only the non-zero ones; per-layer 75% -> conv MACs / 4
    dense, nz = count_flops(live), count_flops(build_model(art), nonzero=True)
    assert art.flops.dense.to_dict() == {"macs": dense.macs, "params": dense.params}
    assert art.flops.pruned.macs == nz.macs
    assert art.flops.ratio == pytest.approx(dense.macs / nz.macs) and art.flops.ratio > 2.5
    conv_dense = sum(layer.macs for layer in dense.layers if layer.type == "Conv2d")
    conv_nz = sum(layer.macs for layer in nz.layers if layer.type == "Conv2d")
    assert conv_dense / conv_nz == pytest.approx(1 / (1 - 0.75), rel=0.01)
    # theta_0 present with keep_init, and it is the initialisation
    assert all(torch.equal(art.init_state[k], v) for k, v in theta0.items())

    # without keep_init no theta_0 is written (pruning a trained model outside a Trainer)
    plain = MagnitudePruning(amount=0.75, artifact_path=None).prune(live)
    assert plain.init_state is None and plain.masks


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="scope must be 'global'"):
        MagnitudePruning(scope="per-layer")
    with pytest.raises(ValueError, match="needs both start_epoch and end_epoch"):
        MagnitudePruning(start_epoch=1)
    with pytest.raises(ValueError, match="0 <= start_epoch <= end_epoch"):
        MagnitudePruning(start_epoch=3, end_epoch=2)
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        MagnitudePruning(start_epoch=0, end_epoch=2, frequency=0)
    with pytest.raises(ValueError, match="relative pruning is one-shot"):
        MagnitudePruning(relative=True, start_epoch=0, end_epoch=2)
    with pytest.raises(ValueError):
        MagnitudePruning(amount=1.0)


# ---- DDP (2 CPU processes, gloo) -----------------------------------------------------------------

PROBE = '''
"""Test-only magnitude callback: rank 1 proposes other masks; every rank records what it ends up with."""
import os

import torch

from callbacks import MagnitudePruning


class ProbeMagnitude(MagnitudePruning):
    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self._rank = 0
        self.proposals = []

    def on_fit_start(self, trainer, pl_module):
        self._rank = trainer.global_rank
        super().on_fit_start(trainer, pl_module)
        decide = self.pruner.compute_masks

        def propose(model, target):
            masks = decide(model, target)
            if self._rank != 0:  # a rank-dependent proposal: the broadcast must override it
                masks = {k: v.flip(0) for k, v in masks.items()}
            self.proposals.append(masks)
            return masks

        self.pruner.compute_masks = propose

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        params = dict(pl_module.model.named_parameters())
        leaked = sum(int(params[n].detach()[~m].count_nonzero()) for n, m in self.masks.items())
        torch.save({"proposals": self.proposals, "final": dict(self.masks), "leaked": leaked,
                    "steps": trainer.global_step},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
'''



def test_ddp_two_processes_hold_rank0_masks_and_write_one_artifact(tmp_path: Path) -> None:
    (tmp_path / "magnitude_probe.py").write_text(PROBE)
    out, run = tmp_path / "probe", tmp_path / "run"
    out.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          strategy: ddp
          devices: 2
          max_epochs: 2
          limit_val_batches: 2
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          callbacks:
            - class_path: magnitude_probe.ProbeMagnitude
              init_args:
                out_dir: {out}
                amount: 0.5
                start_epoch: 0
                end_epoch: 0
        checkpoint:
          save_last: false
        model:
          arch: cifar_resnet20
          cfg: {CFG20}
          lr: 0.1
        data:
          class_path: tests.helpers.RandomImageDataModule
          init_args:
            num_samples: 64
            batch_size: 16
        """))
    run_process([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config)], tmp_path,
                clean_env(tmp_path))

    assert [p.name for p in run.rglob("*.pt")] == ["pruned.pt"]
    assert not list(run.rglob("*.tmp"))
    r0, r1 = (torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert len(r0["proposals"]) == len(r1["proposals"]) == 1  # one prune, at the end of epoch 0
    p0, p1 = r0["proposals"][0], r1["proposals"][0]
    assert any(not torch.equal(p0[k], p1[k]) for k in p0)
    # both ranks adopted rank 0's masks, kept them through the second epoch's steps, and agree
    for r in (r0, r1):
        assert r["final"].keys() == p0.keys()
        assert all(torch.equal(r["final"][k], m) for k, m in p0.items())
        assert r["leaked"] == 0 and r["steps"] == 4  # 64 samples / 2 ranks / 16 per batch, 2 epochs
    art = load_artifact(next(run.rglob("pruned.pt")))
    assert all(torch.equal(art.masks[k], m) for k, m in p0.items())
    assert 1 - sum(int(m.sum()) for m in p0.values()) / sum(m.numel() for m in p0.values()) == pytest.approx(0.5)
