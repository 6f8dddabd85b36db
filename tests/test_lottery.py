"""Lottery tickets (docs/paper-settings.md §10) and the retraining of masked models (spec 1.5, 1.6, 9, 12.2, 12.6).

From a masked artifact, ``rewind`` (winning ticket) starts at exactly theta_0 times the mask, ``scratch``
(random re-init) redraws the kept weights with the density-corrected He init, ``finetune`` inherits the
weights; every regime keeps the mask enforced. Scratch-B's FLOPs ratio is measured after the mask. The
structured variant masks whole filters with their BN and the next layer's input slice, and equals the
physically pruned model. theta_0 travels from the large run's checkpoint through ``lit_prune.prune`` and
every round of an iterative experiment run by ``lit_prune.rethink``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import L1FilterPruning, MagnitudePruning
from lit_prune.artifact import build_model, load_artifact
from lit_prune.cli.prune import main as prune_main
from lit_prune.core.budget import scratch_b_budget
from lit_prune.core.flops import count_flops
from lit_prune.core.groups import channel_groups
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from lit_prune.rethink import Protocol, Stage, load_experiment
from tests.helpers import execute_in_process, randomize_bn

REPO = Path(__file__).resolve().parents[1]
CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]
LOTTERY_50 = REPO / "configs" / "methods" / "lottery_magnitude_50.yaml"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """One intra-op thread (a second only adds contention on a shared 2-core machine), and no global
    state left behind by in-process Lightning runs."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _trainer(root: Path, callbacks: list, max_epochs: int = 1, **kw) -> pl.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "limit_val_batches": 1, **kw}
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=root,
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


def _leaked(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    params = dict(model.named_parameters())
    return sum(int(params[n].detach()[~m.expand_as(params[n])].count_nonzero()) for n, m in masks.items())


def _sparsity(masks: dict[str, torch.Tensor]) -> float:
    return 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StartProbe(pl.Callback):
    """The network's state when training starts (after every setup and restore, before any step)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


# ---- a masked artifact with theta_0 --------------------------------------------------------------


@pytest.fixture(scope="module")
def ticket(tmp_path_factory) -> dict:
    """Full-width ResNet-20: theta_0, "trained" weights (another draw, random BN), and the artifact of an
    80% global magnitude prune of them carrying theta_0 (what ``lit_prune.prune`` writes for a lottery run)."""
    root = tmp_path_factory.mktemp("ticket")
    torch.manual_seed(0)
    theta0 = {k: v.clone() for k, v in create_model("cifar_resnet20", num_classes=10).state_dict().items()}
    torch.manual_seed(1)
    trained = create_model("cifar_resnet20", num_classes=10)
    randomize_bn(trained)
    path = root / "ticket.pt"
    MagnitudePruning(amount=0.8).prune(trained.eval(), path=str(path), init_state=theta0)
    no_init = root / "no_init.pt"
    MagnitudePruning(amount=0.8).prune(trained, path=str(no_init))
    return {"path": path, "no_init": no_init, "theta0": theta0, "art": load_artifact(path)}


@pytest.mark.parametrize("regime", ["rewind", "scratch", "finetune"])
def test_regime_start_and_masks_enforced(regime: str, ticket: dict, tmp_path: Path, tiny_data) -> None:
    art, theta0 = ticket["art"], ticket["theta0"]
    masks = art.masks
    assert art.init_state is not None and _same_state(art.init_state, theta0)
    pl.seed_everything(0)
    module = ImageClassifier(artifact=str(ticket["path"]), regime=regime, lr=0.1, weight_decay=5e-4)
    assert module.masks.keys() == masks.keys()
    probe = StartProbe()
    _trainer(tmp_path, [probe], max_epochs=1).fit(module, datamodule=tiny_data)  # 3 SGD steps
    start = probe.state

    if regime == "rewind":  # the winning ticket: exactly theta_0 * mask, every parameter and buffer
        expected = {k: v * masks[k] if k in masks else v for k, v in theta0.items()}
        assert _same_state(start, expected)
    elif regime == "finetune":  # the pruned weights themselves
        assert _same_state(start, art.state_dict)
    else:  # random re-init: the same mask, values that are neither theta_0 nor the trained ones
        for name, m in masks.items():
            assert torch.equal(start[name] != 0, m), name
            assert not torch.equal(start[name], theta0[name] * m)
            assert not torch.equal(start[name], art.state_dict[name])
    # in every regime the masked weights stayed zero through the steps, and the kept ones trained
    assert _leaked(module.model, masks) == 0
    after = module.model.state_dict()
    assert all(not torch.equal(after[k][m], start[k][m]) for k, m in masks.items())
    # theta_0 travels on with the module (the retrained stage's artifact carries it to the next round)
    assert module.init_state is not None and _same_state(module.init_state, theta0)


def test_scratch_uses_the_density_corrected_he_init_of_each_layer(ticket: dict) -> None:
    """Random re-init (spec 1.5): N(0, sqrt(2 / n)) with n = nnz(mask) / C_in, the layer's own density."""
    masks = ticket["art"].masks
    pl.seed_everything(0)
    model = ImageClassifier(artifact=str(ticket["path"]), regime="scratch").model
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    densities, checked = set(), 0
    for name, conv in convs.items():
        mask = masks[f"{name}.weight"]
        nnz = int(mask.sum())
        if nnz < 1000:  # the stem keeps 208 weights: too few draws to measure a std
            continue
        w = conv.weight.detach()[mask]
        corrected = math.sqrt(2.0 / (nnz / conv.in_channels))
        # four standard errors of a sample std (1 / sqrt(2 nnz)): 3.8% on layer3, 8.7% on layer1
        assert float(w.std()) == pytest.approx(corrected, rel=4 / math.sqrt(2 * nnz)), name
        assert abs(float(w.mean())) < 4 * corrected / math.sqrt(nnz)
        plain = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        assert abs(float(w.std()) - plain) > 0.3 * plain  # the uncorrected fan-out would be far off
        densities.add(round(nnz / mask.numel(), 1))
        checked += 1
    # one global threshold: ~47% kept in layer1, ~31% in layer2, ~15% in layer3, each with its own std
    assert checked == 18 and len(densities) == 3


def test_rewind_needs_theta0_and_a_masked_artifact(ticket: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no initialisation theta_0 to rewind to.*keep_init: true"):
        ImageClassifier(artifact=str(ticket["no_init"]), regime="rewind")
    # a physically pruned artifact cannot be rewound: theta_0 has the large model's shapes
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", cfg=CFG20, num_classes=10)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "narrow.pt"
    L1FilterPruning(prune_ratio=0.5).prune(model, path=str(path), init_state=theta0)
    with pytest.raises(ValueError, match="does not fit its pruned architecture.*mode: mask"):
        ImageClassifier(artifact=str(path), regime="rewind")


# ---- Scratch-B of a masked model ------------------------------------------------------------------


def test_scratch_b_ratio_is_measured_after_the_mask(ticket: dict, tmp_path: Path) -> None:
    """The reference (spec 12.2) counted FLOPs before loading the mask, so r = 1 and Scratch-B = Scratch-E."""
    art = ticket["art"]
    dense = count_flops(build_model(art, weights=False))
    masked = count_flops(build_model(art), nonzero=True)  # build_model applies the masks
    ratio = art.flops.ratio
    assert art.flops.dense.macs == dense.macs and art.flops.pruned.macs == masked.macs
    assert ratio == pytest.approx(dense.macs / masked.macs) and ratio > 3  # 80% of the conv weights gone
    assert count_flops(build_model(art, weights=False), nonzero=True).macs == dense.macs  # the bug's r = 1

    # the protocol runner stretches Scratch-B by that ratio; Scratch-E keeps the large model's epochs
    exp_path = tmp_path / "exp.yaml"
    exp_path.write_text(yaml.safe_dump({
        "name": "m80", "base": str(REPO / "configs" / "quickstart.yaml"), "seeds": [0],
        "args": ["--trainer.max_epochs=20"],
        "variants": [{"name": "m80", "method": str(REPO / "configs" / "methods" / "magnitude_80.yaml")}],
        "regimes": {"scratch_e": {}, "scratch_b": {"rule": "fractions"}}}))
    out = tmp_path / "out"
    (out / "seed0" / "m80" / "prune").mkdir(parents=True)
    (out / "seed0" / "m80" / "prune" / "pruned.pt").write_bytes(ticket["path"].read_bytes())
    proto = Protocol(load_experiment(exp_path), out)
    scratch_e = next(st for st in proto.plan() if st.kind == "scratch_e")
    assert scratch_e.epochs == 20
    st = Stage(0, "m80", "scratch_b", out / "seed0" / "m80" / "scratch_b")
    planned = proto.scratch_b(st)
    budget = scratch_b_budget(20, ratio)
    assert planned.epochs == planned.applied_to(st).epochs == budget.epochs == int(20 * ratio) > 20
    assert f"--trainer.max_epochs={budget.epochs}" in planned.args
    assert st.epochs is None and st.command == []  # the planned stage itself is left as it was


# ---- structured lottery tickets (L1-norm, mask mode) ----------------------------------------------


def test_structured_masks_equal_the_physically_pruned_resnet56_a() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet56").eval()
    randomize_bn(model)  # a BN left unmasked would show in the outputs
    masked_cb = L1FilterPruning(target="A", mode="mask", keep_init=True, artifact_path=None)
    art_m = masked_cb.prune(model)
    art_p = L1FilterPruning(target="A", artifact_path=None).prune(model)
    keeps = L1FilterPruning(target="A").select(model)
    groups = {g.name: g for g in channel_groups(model)}

    # full size, and the same function as the narrow model
    assert art_m.architecture.to_dict() == {"name": "cifar_resnet56", "kwargs": {"cfg": [16] * 9 + [32] * 9 + [64] * 9}}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_model(art_m).eval()(x), build_model(art_p).eval()(x), rtol=1e-4, atol=1e-5)
    # the masked model's non-zero MACs are the narrow model's: Scratch-B gets the same r in both forms
    assert art_m.flops.pruned.macs == art_p.flops.pruned.macs
    assert art_m.flops.ratio == pytest.approx(art_p.flops.ratio)

    masks, state = art_m.masks, art_m.state_dict
    n_pruned = 0
    for name, keep in keeps.items():
        g = groups[name]
        conv_mask = masks[f"{g.conv}.weight"]  # (C_out, 1, 1, 1)
        # whole filters: exactly the non-kept ones (the reference's float index zeroed filters 0 and 1 only)
        assert torch.equal(conv_mask.flatten(), keep), name
        w = state[f"{g.conv}.weight"]
        assert not w[~keep].any() and bool((w[keep].flatten(1).abs().sum(1) > 0).all()), name
        assert torch.equal(masks[f"{g.bn}.weight"].flatten(), keep)
        assert torch.equal(masks[f"{g.bn}.bias"].flatten(), keep)
        assert not state[f"{g.bn}.weight"][~keep].any() and not state[f"{g.bn}.bias"][~keep].any()
        for consumer in g.consumers:  # the next conv's input slice
            assert torch.equal(masks[f"{consumer}.weight"].flatten(), keep), consumer
            assert not state[f"{consumer}.weight"][:, ~keep].any()
        n_pruned += int((~keep).sum())
    assert n_pruned == sum(16 - 14 for _ in range(7)) + (16 - 14) + 8 * (32 - 28) + 7 * (64 - 57)
    assert any(set((~keep).nonzero().flatten().tolist()) - {0, 1} for keep in keeps.values())
    assert any(int((~keep).sum()) > 2 for keep in keeps.values())


def test_structured_ticket_keeps_theta0_and_rewinds_to_it(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1)
    theta0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = L1FilterPruning(prune_ratio=0.5, skip=["layer3.*"], mode="mask", keep_init=True)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(module, datamodule=tiny_data)
    art = load_artifact(cb.written)
    assert art.architecture.kwargs["cfg"] == CFG20 and art.masks
    assert _same_state(art.init_state, theta0)
    rewound = ImageClassifier(artifact=cb.written, regime="rewind").model.state_dict()
    masks = art.masks
    expected = {k: v * masks[k] if k in masks else v for k, v in theta0.items()}
    assert _same_state(rewound, expected)
    assert not rewound["layer1.0.bn1.weight"].all()  # pruned channels' gamma rewound to zero, not to 1


# ---- the prune CLI carries theta_0 ---------------------------------------------------------------


def test_prune_cli_chain_keeps_theta0_and_prunes_relative(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10, lr=0.1)
    theta0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = MagnitudePruning(amount=0.5, relative=True, keep_init=True, threshold="reference")  # as the config
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path / "fit", [cb, ckpt], max_epochs=1, enable_checkpointing=True)
    trainer.fit(module, datamodule=tiny_data)
    last = tmp_path / "ckpt" / "last.ckpt"

    a1, a2 = tmp_path / "round1.pt", tmp_path / "round2.pt"
    assert prune_main(["--checkpoint", str(last), "--config", str(LOTTERY_50), "--out", str(a1)]) == 0
    r1 = load_artifact(a1)
    n = sum(m.numel() for m in r1.masks.values())
    assert _sparsity(r1.masks) == (n // 2 + 1) / n  # the reference's rule (the paper config): k + 1 go
    assert _same_state(r1.init_state, theta0)
    assert r1.provenance.source == str(last) and r1.provenance.settings["relative"] is True
    # the same masks as the callback's own artifact written when that fit ended
    own = load_artifact(cb.written)
    assert all(torch.equal(own.masks[k], m) for k, m in r1.masks.items())

    assert prune_main(["--checkpoint", str(a1), "--config", str(LOTTERY_50), "--out", str(a2)]) == 0
    r2 = load_artifact(a2)
    zeros = n // 2 + 1
    assert _sparsity(r2.masks) == (zeros + (n - zeros) // 2 + 1) / n
    assert all(not (r2.masks[k] & ~m).any() for k, m in r1.masks.items())  # round 1's zeros stay
    assert _same_state(r2.init_state, theta0)
    assert r2.flops.ratio > r1.flops.ratio > 1
    assert _leaked(build_model(r2), r2.masks) == 0


# ---- an iterative lottery experiment through the protocol runner ------------------------------------

TINY_ARGS = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
             "--trainer.limit_test_batches=2", "--data.batch_size=16", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false"]  # "1" would read as 1.0 = every batch (jsonargparse)


def test_two_round_lottery_experiment(tmp_path: Path, monkeypatch) -> None:
    """quickstart_lottery.yaml, one seed and tiny stages: large (theta_0 kept), round 1 (50%), round 2 (50% of
    what round 1's winning ticket kept), each with a winning ticket and a random re-init."""
    src = yaml.safe_load((REPO / "configs" / "experiments" / "quickstart_lottery.yaml").read_text())
    exp = {**src, "name": "lottery_tiny", "base": str(REPO / src["base"]), "seeds": [0], "args": TINY_ARGS,
           "large": {"args": [f"--config={REPO / src['large']['args'][0].split('=', 1)[1]}"]},
           "variants": [{**v, "method": str(REPO / v["method"])} for v in src["variants"]]}
    assert exp["variants"][1]["source"] == {"variant": "round1", "regime": "winning_ticket"}
    config = tmp_path / "lottery.yaml"
    config.write_text(yaml.safe_dump(exp, sort_keys=False))
    out = tmp_path / "out"
    monkeypatch.setattr(Protocol, "_execute", execute_in_process)
    monkeypatch.chdir(tmp_path)
    Protocol(load_experiment(config), out).run()

    table = (out / "results.md").read_text()
    sections = table.split("**round2**")
    assert len(sections) == 2 and "**round1**" in sections[0]
    for section in sections:
        for row in ("Unpruned", "Pruned (no retraining)", "winning_ticket", "random_init"):
            assert f"| {row} |" in section, (row, table)
    assert (out / "results.png").stat().st_size > 0

    seed = out / "seed0"
    theta0 = next(s["init_state"] for s in torch.load(seed / "large" / "checkpoints" / "last.ckpt",
                                                      weights_only=True)["callbacks"].values() if "init_state" in s)
    r1, r2 = (load_artifact(seed / v / "prune" / "pruned.pt") for v in ("round1", "round2"))
    n = sum(m.numel() for m in r1.masks.values())
    assert _sparsity(r1.masks) == pytest.approx(0.5, abs=2 / n)  # the reference rule removes k + 1
    assert _sparsity(r2.masks) == pytest.approx(0.75, abs=3 / n)
    assert all(not (r2.masks[k] & ~m).any() for k, m in r1.masks.items())
    assert _same_state(r1.init_state, theta0) and _same_state(r2.init_state, theta0)
    # round 2 pruned the retrained winning ticket of round 1, not the large model
    assert r2.provenance.source == str(seed / "round1" / "winning_ticket" / "model.pt")
    ticket = load_artifact(seed / "round1" / "winning_ticket" / "model.pt")
    assert _same_state(ticket.init_state, theta0) and _leaked(build_model(ticket), r1.masks) == 0
