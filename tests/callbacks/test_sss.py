"""Sparse Structure Selection: the APG step in a Trainer, exact block removal, resume, DDP, arguments, configs."""

from __future__ import annotations

import copy
import os
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from callbacks import SparseStructureSelection
from lit_prune.artifact import load_artifact, load_model
from lit_prune.core.gates import apg_step_, block_gates
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from lit_prune.sources import load_method
from tests.helpers import RandomImageDataModule, clean_env, randomize_bn, run_process

REPO = Path(__file__).resolve().parents[2]
CFG20 = [4] * 3 + [8] * 3 + [16] * 3
PROBE_ENV = "LIT_PRUNE_SSS_PROBE"


def _module(**kwargs) -> ImageClassifier:
    # constant LR: the default multistep schedule of a 1-epoch run would already sit at lr / 100
    args = {"arch": "cifar_resnet20", "cfg": CFG20, "model_kwargs": {"gates": True}, "num_classes": 10, "lr": 0.1,
            "schedule": "constant", **kwargs}
    return ImageClassifier(**args)


def _trainer(callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(callbacks=callbacks, **args)


def _lambdas(model: nn.Module) -> dict[str, float]:
    return {p: g.value for p, g in block_gates(model).items()}


class GateRecorder(pl.Callback):
    """Records the factors and their gradients at ``on_before_optimizer_step`` (place it before or after SSS)."""

    def __init__(self) -> None:
        self.lams: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        gates = block_gates(pl_module.model)
        self.lams.append({p: g.weight.detach().clone() for p, g in gates.items()})
        self.grads.append({p: None if g.weight.grad is None else g.weight.grad.clone() for p, g in gates.items()})


# ---- the APG step inside a Trainer ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32", "16-mixed-scaled"])
def test_trainer_step_is_apg_on_unscaled_grads_without_weight_decay(precision: str) -> None:
    pl.seed_everything(0)
    module = _module(weight_decay=0.5)  # a large decay: any of it on the factors would show
    plugins = []
    if precision == "16-mixed-scaled":
        # fp16 autocast with a real GradScaler on CPU: Lightning unscales only the optimizer's parameters
        from pytorch_lightning.plugins.precision import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]
    before, after = GateRecorder(), GateRecorder()
    cb = SparseStructureSelection(gamma=0.3, momentum=0.9, prune_at_end=False, artifact_path=None)
    trainer = _trainer([before, cb, after], max_steps=2, accumulate_grad_batches=2, plugins=plugins)
    trainer.fit(module, datamodule=RandomImageDataModule(num_samples=16, batch_size=4))  # fp16 convs are slow on CPU

    scale = 1024.0 if precision == "16-mixed-scaled" else 1.0
    assert len(before.grads) == 2  # once per optimizer step, not per accumulated batch
    gates = block_gates(module.model)
    v = {p: torch.zeros(()) for p in gates}
    for step in range(2):
        for p in gates:
            lam = before.lams[step][p].clone()
            apg_step_(lam, before.grads[step][p] / scale, v[p], lr=0.1, gamma=0.3, momentum=0.9)
            torch.testing.assert_close(after.lams[step][p], lam, rtol=0, atol=1e-7)
            assert after.grads[step][p] is None  # consumed and cleared: nothing accumulates into the next step
    assert all(torch.equal(cb._velocity[p], v[p]) for p in gates)
    assert any(lam != 1.0 for lam in _lambdas(module.model).values())
    if scale != 1.0:  # the division mattered: the scaled gradient would have given other factors
        lam = before.lams[0]["layer1.0.gate"].clone()
        apg_step_(lam, before.grads[0]["layer1.0.gate"], torch.zeros(()), lr=0.1, gamma=0.3, momentum=0.9)
        assert not torch.allclose(lam, after.lams[0]["layer1.0.gate"], atol=1e-3)

    # the factors are not in the SGD optimizer (no weight decay, no SGD step), every other parameter is
    params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    gate_ids = {id(g.weight) for g in gates.values()}
    assert not gate_ids.intersection(map(id, params))
    assert len(params) == len(list(module.parameters())) - len(gates)


def test_large_penalty_zeroes_factors_and_export_drops_the_blocks(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = _module()
    cb = SparseStructureSelection(gamma=4.0, artifact_path=str(tmp_path / "sss.pt"))
    rec = GateRecorder()
    # 3 steps with threshold lr * gamma = 0.4: lam = 1.9 (0.6 - 0.1 grad) - 0.9 ~ 0.24 after one, 0 after two
    trainer = _trainer([cb, rec], max_epochs=1)
    trainer.fit(module, datamodule=RandomImageDataModule())
    assert all(lam > 0 for lam in map(float, rec.lams[0].values()))  # after one step, not yet
    assert all(lam == 0.0 for lam in _lambdas(module.model).values())  # exactly 0 after three
    assert trainer.callback_metrics["sss/zero_blocks"] == 9
    assert trainer.callback_metrics["sss/lambda/layer2.0"] == 0.0

    art = load_artifact(tmp_path / "sss.pt")
    assert art.architecture.kwargs == {"cfg": [0] * 9, "num_classes": 10}  # ungated, every branch gone
    assert art.provenance.method == "sss" and art.provenance.settings["gamma"] == 4.0
    assert art.flops.dense.params == sum(p.numel() for p in module.parameters()) - 9  # without gates
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "sss.pt")(x), module.model.eval()(x), rtol=1e-4, atol=1e-5)
    assert len(block_gates(module.model)) == 9  # the live model keeps its gates


# ---- export: block removal and folding are exact ---------------------------------------------------

# (name, kwargs, input side, blocks whose factor is set to 0, expected architecture kwargs after export)
EXPORTS = {
    "cifar_resnet20": ("cifar_resnet20", {"cfg": CFG20}, 32, ["layer1.1", "layer2.0", "layer3.2"],
                       {"cfg": [4, 0, 4, 0, 8, 8, 16, 16, 0]}),
    "bearpaw_resnet50": ("bearpaw_resnet50", {"cfg": [3] * 24}, 32, ["layer1.0", "layer2.0", "layer2.3"],
                         {"cfg": [0] + [3] * 7 + [0, 3, 3, 0] + [3] * 12}),
    "resnet50": ("resnet50", {"cfg": [[4, 3]] * 16}, 64, ["layer1.0", "layer3.2", "layer4.2"],
                 {"cfg": [[0, 0]] + [[4, 3]] * 8 + [[0, 0]] + [[4, 3]] * 5 + [[0, 0]]}),
    "sss_resnet50": ("sss_resnet50", {"widths": [[4, 3]] * 16}, 64, ["layer1.0", "layer3.2", "layer4.2"],
                     {"cfg": [[2, False], [4, True], [5, True], [2, True]], "widths": [[4, 3]] * 13}),
}


@pytest.mark.parametrize("family", sorted(EXPORTS))
def test_export_removes_zero_blocks_folds_the_rest_and_equals_the_gated_model(family: str, tmp_path: Path) -> None:
    name, kwargs, side, zero, expected = EXPORTS[family]
    torch.manual_seed(0)
    model = create_model(name, gates=True, **kwargs).eval()
    randomize_bn(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, gate in block_gates(model).items():
            gate.weight.fill_(0.0 if path.removesuffix(".gate") in zero else 0.2 + float(torch.rand((), generator=g)))
    cb = SparseStructureSelection(artifact_path=str(tmp_path / "p.pt"))
    keeps = cb.pruner.keeps(model)
    assert {k.rsplit(".", 1)[0] for k in keeps} == set(zero) and not any(k.any() for k in keeps.values())

    art = cb.prune(model)
    assert {k: v for k, v in art.architecture.kwargs.items() if k != "num_classes"} == expected
    assert not any("gate" in k for k in art.state_dict)
    assert art.flops.ratio > 1
    pruned = load_model(tmp_path / "p.pt")
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(pruned(x), out, rtol=1e-4, atol=1e-5)
        ungated = copy.deepcopy(model)
        for gate in block_gates(ungated).values():
            gate.weight.fill_(1.0)
        assert not torch.allclose(ungated(x), out, atol=1e-3)  # the factors did change the function
    assert len(block_gates(model)) == len(block_gates(create_model(name, gates=True, **kwargs)))  # live: untouched


def test_no_zero_factor_exports_the_folded_full_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", cfg=CFG20, gates=True).eval()
    randomize_bn(model)
    with torch.no_grad():
        model.layer2[1].gate.weight.fill_(0.3)
    cb = SparseStructureSelection(artifact_path=None)
    assert cb.pruner.keeps(model) == {}
    art = cb.prune(model)
    assert art.architecture.kwargs == {"cfg": CFG20}
    assert art.flops.ratio == pytest.approx(1.0)
    pruned = create_model("cifar_resnet20", cfg=CFG20).eval()
    pruned.load_state_dict(art.state_dict)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


def test_removing_every_block_warns_that_gamma_is_too_large() -> None:
    model = create_model("cifar_resnet20", cfg=CFG20, gates=True).eval()
    with torch.no_grad():
        for gate in block_gates(model).values():
            gate.weight.zero_()
    cb = SparseStructureSelection(artifact_path=None)
    with pytest.warns(UserWarning, match="removes every one of the 9 residual blocks.*gamma"):
        art = cb.prune(model)
    assert art.architecture.kwargs["cfg"] == [0] * 9


# ---- resume ---------------------------------------------------------------------------------------


class OrderedData(RandomImageDataModule):
    """The tiny random data without shuffling: a resumed run sees the batches an uninterrupted run sees."""

    def train_dataloader(self):
        return self._loader(False)


def test_resume_reproduces_factors_and_velocity(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: Path | None = None) -> tuple[ImageClassifier, SparseStructureSelection, pl.Trainer]:
        pl.seed_everything(0)
        cb = SparseStructureSelection(gamma=0.2, prune_at_end=False, artifact_path=None)
        module = _module()
        trainer = _trainer([cb], max_epochs=max_epochs, deterministic=True, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=OrderedData(), ckpt_path=ckpt)
        return module, cb, trainer

    full, cb_full, _ = run(2)
    half, cb_half, trainer = run(1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][cb_half.state_key]
    assert state["schedule"]["velocity"].keys() == cb_half._velocity.keys() and len(state["schedule"]["velocity"]) == 9
    assert all(torch.equal(state["schedule"]["velocity"][k], v) for k, v in cb_half._velocity.items())

    resumed, cb_resumed, _ = run(2, ckpt)
    assert _lambdas(resumed.model) == _lambdas(full.model)
    assert _lambdas(half.model) != _lambdas(full.model)  # the second epoch moved them: not just the checkpoint
    assert cb_resumed._velocity.keys() == cb_full._velocity.keys()
    assert all(torch.equal(cb_resumed._velocity[k], v) for k, v in cb_full._velocity.items())
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ---- arguments, models without gates, foreign optimizers, configs ----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"gamma": -0.01}, "gamma"), ({"gamma": "0.01"}, "gamma"), ({"gamma": float("inf")}, "gamma"),
     ({"momentum": 1.0}, "momentum"), ({"momentum": -0.1}, "momentum"), ({"prune_at_end": "yes"}, "prune_at_end")],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SparseStructureSelection(**kwargs)


def test_a_model_without_gates_is_refused_before_training() -> None:
    module = _module(model_kwargs=None)
    cb = SparseStructureSelection()
    with pytest.raises(ValueError, match=r"model_kwargs: \{gates: true\}"):
        _trainer([cb], max_steps=1).fit(module, datamodule=RandomImageDataModule(num_samples=16))
    with pytest.raises(ValueError, match="has none"):
        cb.prune(module.model)


class _OwnOptimizer(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_optimizer_that_also_updates_the_factors_is_refused() -> None:
    module = _OwnOptimizer(arch="cifar_resnet20", cfg=CFG20, model_kwargs={"gates": True}, num_classes=10)
    with pytest.raises(ValueError, match="also updates the SSS block factors"):
        _trainer([SparseStructureSelection()], max_steps=1).fit(module, datamodule=RandomImageDataModule(16))


# (file, base config, gamma, model)
CONFIGS = [("sss_resnet50.yaml", "configs/imagenet/sss_resnet50.yaml", 0.01, "sss_resnet50"),
           ("sss_resnet56.yaml", "configs/cifar/l1_resnet56.yaml", 0.01, "cifar_resnet56")]


@pytest.mark.parametrize(("file", "base", "gamma", "arch"), CONFIGS)
def test_method_configs(file: str, base: str, gamma: float, arch: str) -> None:
    path = REPO / "configs" / "methods" / file
    text = path.read_text()
    assert text.splitlines()[0] == f"# base: {base}"
    assert f"--config {base} --config configs/methods/{file}" in text
    doc = yaml.safe_load(text)
    assert doc["model"] == {"model_kwargs": {"gates": True}}  # the factors exist before the optimizer
    assert yaml.safe_load((REPO / base).read_text())["model"]["arch"] == arch
    cb = load_method(path)
    assert isinstance(cb, SparseStructureSelection)
    assert (cb.pruner.gamma, cb.pruner.momentum, cb.prune_at_end) == (gamma, 0.9, True)


# ---- DDP (2 CPU processes, gloo), started as its own train.py process ------------------------------


class RankProbeSSS(SparseStructureSelection):
    """Test-only: each rank saves its factors and velocities to ``$LIT_PRUNE_SSS_PROBE`` before pruning."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lams = {p: g.weight.detach().cpu().clone() for p, g in block_gates(pl_module.model).items()}
        velocity = {p: v.cpu().clone() for p, v in self._velocity.items()}
        out = Path(os.environ[PROBE_ENV]) / f"rank{trainer.global_rank}.pt"
        torch.save({"lambdas": lams, "velocity": velocity}, out)
        super().on_train_end(trainer, pl_module)


# ~25 s (two processes, each importing torch and Lightning); the default suite checks SSS's DDP contract in
# test_ddp_contract.py, this one adds that the factors moved and the artifact is the final checkpoint's export
@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_factors_and_write_one_artifact(tmp_path: Path) -> None:
    probe, run = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    config = tmp_path / "sss.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        model:
          arch: cifar_resnet20
          cfg: {CFG20}
          model_kwargs: {{gates: true}}
          lr: 0.1
          schedule: constant
        data:
          class_path: tests.helpers.RandomImageDataModule
          init_args: {{num_samples: 64, batch_size: 16}}
        trainer:
          accelerator: cpu
          strategy: ddp
          devices: 2
          max_epochs: 2
          limit_val_batches: 1
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          callbacks:
            - class_path: tests.callbacks.test_sss.RankProbeSSS
              init_args: {{gamma: 0.5}}
        """))
    run_process([sys.executable, "train.py", "fit", "--config", str(config)], REPO,
                clean_env(extra={PROBE_ENV: str(probe)}))

    artifacts = sorted(run.rglob("*.pt"))
    assert [p.name for p in artifacts] == ["pruned.pt"], artifacts
    assert not list(run.rglob("*.tmp"))

    # every rank saw other batches, yet the averaged gradients gave bit-identical factors and velocities
    ranks = [torch.load(probe / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    for key in ("lambdas", "velocity"):
        assert ranks[0][key].keys() == ranks[1][key].keys() and len(ranks[0][key]) == 9
        assert all(torch.equal(v, ranks[1][key][p]) for p, v in ranks[0][key].items())
    lams = [float(v) for v in ranks[0]["lambdas"].values()]
    assert all(lam < 1 for lam in lams)  # they did move

    # the artifact is the export of the final checkpoint, which holds the same factors
    (ckpt,) = run.rglob("last.ckpt")
    trained = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").model.eval()
    assert all(torch.equal(g.weight.detach(), ranks[0]["lambdas"][p]) for p, g in block_gates(trained).items())
    expected = SparseStructureSelection(artifact_path=None).prune(trained)
    art = load_artifact(artifacts[0])
    assert art.architecture == expected.architecture
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(artifacts[0])(x), trained(x), rtol=1e-4, atol=1e-5)
