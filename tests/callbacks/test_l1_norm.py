"""L1-norm filter pruning: the paper's targets, the generic form, validation, and real Trainer runs."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from callbacks import L1FilterPruning
from lit_prune.artifact import load_artifact, load_model
from lit_prune.core.flops import count_flops
from lit_prune.core.masks import apply_masks
from lit_prune.models import create_model, get_width_config
from lit_prune.module import ImageClassifier
from tests.helpers import clean_env, masks_from_keeps, randomize_bn, run_process

REPO = Path(__file__).resolve().parents[2]
CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]

# docs/paper-settings.md §3.3 / 3.4, written out here rather than read from the registry
RESNET56_B = [6] * 7 + [16, 16] + [32] + [22] * 6 + [32, 22] + [64] + [57] * 7 + [64]
RESNET34_A = [64, 44, 44, 128, 89, 89, 128, 256, 179, 179, 179, 179, 256, 512, 512, 512]
RESNET56_B_GENERIC = {
    "prune_ratio": {"layer1.*": 0.6, "layer2.*": 0.3, "layer3.*": 0.1},
    # conv ids 16, 18, 20, 34, 38, 54 of the reference numbering
    "skip": ["layer1.7.conv1", "layer1.8.conv1", "layer2.0.conv1", "layer2.7.conv1", "layer3.0.conv1",
             "layer3.8.conv1"],
}


def _widths(keeps: dict[str, torch.Tensor]) -> list[int]:
    return [int(k.sum()) for k in keeps.values()]


@pytest.fixture(scope="module")
def resnet56() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cifar_resnet56")


# ---- the paper's targets -------------------------------------------------------------------------


def test_target_b_on_resnet56_gives_paper_widths_and_flops(resnet56) -> None:
    cb = L1FilterPruning(target="B", artifact_path=None)
    keeps = cb.select(resnet56)
    assert _widths(keeps) == RESNET56_B == get_width_config("cifar_resnet56", "B")
    art = cb.prune(resnet56)
    assert art.architecture.to_dict() == {"name": "cifar_resnet56", "kwargs": {"cfg": RESNET56_B}}
    assert art.flops.ratio == pytest.approx(1.379, rel=0.01)
    assert art.provenance.method == "l1_norm" and art.provenance.settings["target"] == "B"
    assert cb.written is None  # artifact_path=None writes nothing
    # the live model is untouched: export prunes a copy
    assert [b.width for b in resnet56.blocks()] == [16] * 9 + [32] * 9 + [64] * 9


def test_generic_form_reproduces_target_b(resnet56) -> None:
    cb = L1FilterPruning(**RESNET56_B_GENERIC, artifact_path=None)
    keeps = cb.select(resnet56)
    assert _widths(keeps) == RESNET56_B
    # same filters too, not only the same counts
    target = L1FilterPruning(target="B", artifact_path=None).select(resnet56)
    assert all(torch.equal(keeps[n], target[n]) for n in keeps)


def test_target_a_on_resnet34_gives_paper_cfg() -> None:
    torch.manual_seed(0)
    model = create_model("resnet34")
    keeps = L1FilterPruning(target="A", artifact_path=None).select(model)
    assert _widths(keeps) == RESNET34_A


# ---- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"target": "B", "prune_ratio": 0.5}, {"prune_ratio": 0.5, "keep": {"layer1.0.conv1": 2}}, {}],
    ids=["target+ratio", "ratio+keep", "none"],
)
def test_exactly_one_of_target_ratio_keep(kwargs) -> None:
    with pytest.raises(ValueError, match="exactly one of target"):
        L1FilterPruning(**kwargs)


@pytest.mark.parametrize("ratio", [1.0, {"layer1.*": 1.0}, -0.1])
def test_ratio_outside_unit_interval_is_refused(ratio) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        L1FilterPruning(prune_ratio=ratio)


def test_other_constructor_errors() -> None:
    with pytest.raises(ValueError, match="unknown criterion 'l3'"):
        L1FilterPruning(prune_ratio=0.5, criterion="l3")
    with pytest.raises(ValueError, match="non-negative ints"):
        L1FilterPruning(keep={"layer1.0.conv1": -1})
    with pytest.raises(ValueError, match="floor must be >= 0"):
        L1FilterPruning(prune_ratio=0.5, floor=-1)


def test_unknown_patterns_are_refused_on_select() -> None:
    model = create_model("cifar_resnet20", cfg=CFG20)
    with pytest.raises(ValueError, match=r"skip pattern 'layer4\.\*' matches no prunable layer"):
        L1FilterPruning(prune_ratio=0.5, skip=["layer4.*"]).select(model)
    with pytest.raises(ValueError, match="prune_ratio pattern 'conv1' matches no prunable layer"):
        L1FilterPruning(prune_ratio={"conv1": 0.5}).select(model)  # the stem is not prunable
    with pytest.raises(ValueError, match="keep pattern"):
        L1FilterPruning(keep={"layer1.0.conv2": 2}).select(model)
    with pytest.raises(KeyError, match="no width config named 'Z'"):
        L1FilterPruning(target="Z").select(model)


def test_keep_larger_than_layer_is_refused() -> None:
    model = create_model("cifar_resnet20", cfg=CFG20)
    with pytest.raises(ValueError, match=r"target width 5 of 'layer1.0.conv1' is larger than the layer \(4 filters\)"):
        L1FilterPruning(keep={"layer1.0.conv1": 5}).select(model)


def test_target_needs_a_zoo_model() -> None:
    model = create_model("cifar_resnet20", cfg=CFG20)
    del model.zoo_name
    with pytest.raises(ValueError, match="target needs a zoo model"):
        L1FilterPruning(target="B").select(model)


# ---- which filters are kept ----------------------------------------------------------------------


def test_keeps_the_largest_l1_filters() -> None:
    model = create_model("cifar_resnet20")
    conv = model.layer2[1].conv1  # (32, 32, 3, 3)
    # filter j gets |w| = l1[j] / (32 * 9) in every entry, with random signs: L1 norm l1[j]
    l1 = torch.randperm(32, generator=torch.Generator().manual_seed(0)).float() + 1
    signs = torch.randint(0, 2, conv.weight.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        conv.weight.copy_(signs * (l1 / (32 * 9)).reshape(32, 1, 1, 1))
    original = conv.weight.detach().clone()
    cb = L1FilterPruning(keep={"layer2.1.conv1": 5}, artifact_path=None)
    keeps = cb.select(model)
    expected = l1.argsort(descending=True)[:5].sort().values
    assert keeps["layer2.1.conv1"].nonzero().flatten().tolist() == expected.tolist()
    assert _widths(keeps) == [16] * 3 + [32, 5, 32] + [64] * 3  # layers not named stay whole
    # the exported weights are exactly those filters, in their original order
    art = cb.prune(model)
    torch.testing.assert_close(art.state_dict["layer2.1.conv1.weight"], original[expected])


def test_l2_criterion_can_disagree_with_l1() -> None:
    model = create_model("cifar_resnet20", cfg=CFG20)
    w = model.layer1[0].conv1.weight  # (4, 16, 3, 3)
    with torch.no_grad():
        w.zero_()
        w[0, 0, 0, 0] = 3.0  # L1 3, L2 3
        w[1, :2, 0, 0] = 2.0  # L1 4, L2 2.83
    keep = {"layer1.0.conv1": 1}
    assert L1FilterPruning(keep=keep).select(model)["layer1.0.conv1"].tolist() == [False, True, False, False]
    assert L1FilterPruning(keep=keep, criterion="l2").select(model)["layer1.0.conv1"].tolist() == [
        True, False, False, False]


def test_branch_may_vanish_and_floor_keeps_it() -> None:
    model = create_model("cifar_resnet20", cfg=CFG20)
    art = L1FilterPruning(keep={"layer1.0.conv1": 0}, artifact_path=None).prune(model)
    assert art.architecture.kwargs["cfg"] == [0] + CFG20[1:]
    floored = L1FilterPruning(keep={"layer1.0.conv1": 0}, floor=1, artifact_path=None).select(model)
    assert _widths(floored)[0] == 1


# ---- a real Trainer run --------------------------------------------------------------------------


def test_fit_writes_artifact_equal_to_masked_model(tmp_path: Path, tiny_data) -> None:
    pl.seed_everything(0)
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=tiny_data.num_classes, lr=0.05)
    cb = L1FilterPruning(prune_ratio=0.5, skip=["layer3.*"])
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=tiny_data)

    path = Path(trainer.log_dir) / "pruned.pt"
    assert path.is_file() and cb.written == str(path)
    raw = torch.load(path, weights_only=True)
    assert raw["architecture"]["kwargs"]["cfg"] == [2, 2, 2, 4, 4, 4, 16, 16, 16]
    assert raw["flops"]["dense"]["macs"] == count_flops(module.model).macs
    assert raw["provenance"]["settings"]["prune_ratio"] == 0.5

    # the trained (still full-size) model, masked with the same selection, computes the same function
    trained = module.model
    keeps = cb.select(trained)
    assert _widths(keeps) == raw["architecture"]["kwargs"]["cfg"]
    masked = copy.deepcopy(trained).eval()
    apply_masks(masked, masks_from_keeps(masked, keeps))
    pruned = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(pruned(x), trained.eval()(x), atol=1e-3)


def test_export_masked_equals_pruned_with_random_bn(tmp_path: Path) -> None:
    """Same check without a Trainer but with random BN statistics (trained BN is close to identity)."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", cfg=CFG20).eval()
    randomize_bn(model)
    cb = L1FilterPruning(prune_ratio={"layer1.*": 0.5, "layer2.*": 0.75}, artifact_path=str(tmp_path / "p.pt"))
    cb.prune(model)
    masked = copy.deepcopy(model)
    apply_masks(masked, masks_from_keeps(masked, cb.select(model)))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "p.pt")(x), masked(x), rtol=1e-4, atol=1e-5)


# ---- DDP (2 CPU processes, gloo) -----------------------------------------------------------------

PROBE = '''
"""Test-only L1 callback whose proposals differ by rank, recording what each rank ends up with."""
import os

import torch

from callbacks import L1FilterPruning
from tests.helpers import masks_from_keeps


class ProbeL1(L1FilterPruning):
    def __init__(self, out_dir: str, prune_ratio: float = 0.5) -> None:
        super().__init__(prune_ratio=prune_ratio)
        self.out_dir = out_dir
        self._rank = 0

    def _save(self, obj, name: str) -> None:
        torch.save(obj, os.path.join(self.out_dir, f"{name}_rank{self._rank}.pt"))

    def on_train_start(self, trainer, pl_module):
        self._rank = trainer.global_rank
        super().on_train_start(trainer, pl_module)
        # each rank proposes other masks; set_masks must adopt rank 0's on every rank
        keep = torch.zeros(4, dtype=torch.bool)
        keep[[self._rank, self._rank + 2]] = True
        proposal = masks_from_keeps(pl_module.model, {"layer1.1.conv1": keep})
        self.set_masks(trainer, pl_module.model, proposal, trainer.optimizers[0])
        self._save({"proposed": proposal, "adopted": self.masks}, "masks")

    def decide(self, model, ctx):
        decision = super().decide(model, ctx)
        if self._rank != 0:  # a rank-dependent decision: broadcast must override it
            decision.keeps = {k: v.roll(1) for k, v in decision.keeps.items()}
        self._save(decision.keeps, "proposed")
        return decision

    def export(self, model, decision, **kwargs):
        params = dict(model.named_parameters())
        leaked = sum(int((params[n].detach() * ~m).count_nonzero()) for n, m in self.masks.items())
        self._save({"keeps": dict(decision.keeps), "leaked": leaked}, "final")
        return super().export(model, decision, **kwargs)
'''




# the default suite checks L1's DDP contract (ranks agree, one artifact) in test_ddp_contract.py; this one adds
# rank-dependent proposals that rank 0's broadcast must override
@pytest.mark.slow
def test_ddp_two_processes_write_one_artifact_with_rank0_decisions(tmp_path: Path) -> None:
    (tmp_path / "ddp_probe.py").write_text(PROBE)
    out = tmp_path / "probe"
    out.mkdir()
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          strategy: ddp
          devices: 2
          max_epochs: 1
          limit_val_batches: 1
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          callbacks:
            - class_path: ddp_probe.ProbeL1
              init_args:
                out_dir: {out}
                prune_ratio: 0.5
        checkpoint:
          save_last: false
        model:
          arch: cifar_resnet20
          cfg: {CFG20}
          lr: 0.05
        data:
          class_path: tests.helpers.RandomImageDataModule
          init_args:
            num_samples: 64
            batch_size: 16
        """))
    run_process([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config)], tmp_path,
                clean_env(tmp_path))

    artifacts = sorted(run.rglob("*.pt"))
    assert [p.name for p in artifacts] == ["pruned.pt"], artifacts
    assert not list(run.rglob("*.tmp"))
    art = load_artifact(artifacts[0])
    assert art.architecture.kwargs["cfg"] == [2, 2, 2, 4, 4, 4, 8, 8, 8]

    r = [{n: torch.load(out / f"{n}_rank{i}.pt", weights_only=True) for n in ("masks", "proposed", "final")}
         for i in (0, 1)]
    # masks: the ranks proposed different ones, and both adopted rank 0's and kept them enforced
    assert not torch.equal(r[0]["masks"]["proposed"]["layer1.1.conv1.weight"],
                           r[1]["masks"]["proposed"]["layer1.1.conv1.weight"])
    for rank in r:
        assert rank["masks"]["adopted"].keys() == r[0]["masks"]["proposed"].keys()
        assert all(torch.equal(rank["masks"]["adopted"][k], v) for k, v in r[0]["masks"]["proposed"].items())
        assert rank["final"]["leaked"] == 0
    # keeps: rank 1's own proposal differed, but both ranks exported rank 0's
    assert any(not torch.equal(r[0]["proposed"][n], r[1]["proposed"][n]) for n in r[0]["proposed"])
    for rank in r:
        assert all(torch.equal(rank["final"]["keeps"][n], k) for n, k in r[0]["proposed"].items())
    # the artifact is rank 0's selection
    assert art.architecture.kwargs["cfg"] == _widths(r[0]["proposed"])
