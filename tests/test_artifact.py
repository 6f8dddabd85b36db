"""The pruned artifact: round trip, weights_only loading, atomic writes, and clear errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lit_prune.artifact import (
    FORMAT,
    VERSION,
    Architecture,
    Artifact,
    FlopsSummary,
    Provenance,
    build_model,
    load_artifact,
    load_model,
    load_weights,
    make_artifact,
    save_artifact,
)
from lit_prune.core.flops import count_flops
from lit_prune.core.surgery import prune_groups
from lit_prune.methods.state import Counts
from lit_prune.models import create_model
from lit_prune.module import ImageClassifier
from tests.helpers import RandomImageDataModule, masks_from_keeps, randomize_bn

CFG20 = [4, 4, 4, 8, 8, 8, 16, 16, 16]


def _pruned_resnet20() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, pruned) cifar_resnet20 with random BN and one residual branch removed."""
    torch.manual_seed(0)
    dense = create_model("cifar_resnet20", num_classes=7).eval()
    randomize_bn(dense)
    g = torch.Generator().manual_seed(0)
    keeps = {f"layer{s}.{b}.conv1": torch.rand(16 * 2 ** (s - 1), generator=g) < 0.5
             for s in (1, 2, 3) for b in range(3)}
    keeps["layer2.1.conv1"][:] = False
    pruned = copy.deepcopy(dense)
    prune_groups(pruned, keeps)
    return dense, pruned.eval()


@pytest.fixture
def pruned_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return _pruned_resnet20()


def _make(dense: torch.nn.Module, pruned: torch.nn.Module, **kw) -> Artifact:
    return make_artifact(pruned, method="l1_norm", settings={"prune_ratio": 0.5}, source="large.ckpt",
                         dense=Counts.of(dense), **kw)


def test_round_trip_and_weights_only(tmp_path: Path, pruned_pair) -> None:
    dense, pruned = pruned_pair
    art = _make(dense, pruned)
    path = save_artifact(art, tmp_path / "sub" / "pruned.pt")  # parent folder is created
    assert path == tmp_path / "sub" / "pruned.pt" and path.is_file()

    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["format"] == FORMAT and raw["version"] == VERSION
    assert raw["architecture"]["name"] == "cifar_resnet20"
    assert raw["architecture"]["kwargs"]["num_classes"] == 7
    assert raw["architecture"]["kwargs"]["cfg"][4] == 0  # layer2.1's branch is gone
    assert raw["provenance"]["method"] == "l1_norm" and raw["provenance"]["source"] == "large.ckpt"
    assert raw["provenance"]["settings"] == {"prune_ratio": 0.5}
    assert raw["init_state"] is None and raw["masks"] == {}
    assert raw["flops"]["pruned"]["macs"] == count_flops(pruned).macs
    assert raw["flops"]["ratio"] == pytest.approx(count_flops(dense).macs / count_flops(pruned).macs)
    assert raw["flops"]["ratio"] > 1.2

    assert raw.keys() == art.to_dict().keys()  # the file is exactly the artifact's on-disk layout

    loaded = load_artifact(path)
    assert isinstance(loaded, Artifact)
    assert (loaded.architecture, loaded.flops, loaded.provenance) == (art.architecture, art.flops, art.provenance)
    assert loaded.input_size == art.input_size == (3, 32, 32)
    assert loaded.state_dict.keys() == art.state_dict.keys()
    for k, v in art.state_dict.items():
        assert torch.equal(loaded.state_dict[k], v), k

    model = load_model(path)
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned(x), rtol=0, atol=0)


def test_artifact_masks_are_applied_on_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", cfg=CFG20)
    keep = torch.tensor([True, False, True, False])
    masks = masks_from_keeps(model, {"layer1.0.conv1": keep})
    dense_macs = count_flops(model).macs
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    art = make_artifact(model, method="sfp", masks=masks, init_state=init_state)  # weights not yet masked
    save_artifact(art, tmp_path / "masked.pt")
    loaded = load_artifact(tmp_path / "masked.pt")
    assert set(loaded.masks) == set(masks) and all(m.dtype == torch.bool for m in loaded.masks.values())
    assert torch.equal(loaded.init_state["conv1.weight"], init_state["conv1.weight"])
    rebuilt = build_model(loaded)
    assert torch.all(rebuilt.layer1[0].conv1.weight[~keep] == 0)
    assert torch.all(rebuilt.layer1[0].conv1.weight[keep] != 0)
    assert torch.all(rebuilt.layer1[0].bn1.weight[~keep] == 0)
    # masked FLOPs: an artifact with masks counts only the non-zero weights of the model it is given
    again = make_artifact(rebuilt, method="sfp", dense=Counts(macs=dense_macs, params=0), masks=loaded.masks)
    assert again.flops.pruned.macs < dense_macs
    assert build_model(loaded, weights=False).layer1[0].conv1.weight.abs().sum() > 0  # fresh init, no masks


class _PartialSave:
    """Stand-in for torch.save that writes some bytes, then fails (a full disk, a killed job)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, obj, f, *args, **kwargs) -> None:
        self.calls += 1
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")


def test_atomic_write_leaves_nothing_when_save_fails(tmp_path: Path, pruned_pair, monkeypatch) -> None:
    art = _make(*pruned_pair)
    target = tmp_path / "pruned.pt"
    failing = _PartialSave()
    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match="No space left"):
        save_artifact(art, target)
    assert failing.calls == 1
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_atomic_write_keeps_previous_artifact_when_save_fails(tmp_path: Path, pruned_pair, monkeypatch) -> None:
    dense, pruned = pruned_pair
    target = tmp_path / "pruned.pt"
    save_artifact(_make(dense, pruned), target)
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", _PartialSave())
    with pytest.raises(OSError):
        save_artifact(_make(dense, dense), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.pt"]
    monkeypatch.undo()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(target)(x), pruned(x))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pruned.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_artifact(missing)


def test_truncated_file_is_a_value_error(tmp_path: Path, pruned_pair) -> None:
    path = save_artifact(_make(*pruned_pair), tmp_path / "pruned.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable lit-prune artifact"):
        load_artifact(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        load_artifact(path)


def test_other_torch_files_are_refused(tmp_path: Path, pruned_pair) -> None:
    _, pruned = pruned_pair
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")  # a bare state dict
    with pytest.raises(ValueError, match="not a lit-prune artifact"):
        load_artifact(tmp_path / "weights.pt")
    raw = _make(*pruned_pair).to_dict()
    raw["version"] = VERSION + 1
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=f"version {VERSION + 1}"):
        load_artifact(tmp_path / "future.pt")


def test_lightning_checkpoint_is_refused(tmp_path: Path) -> None:
    module = ImageClassifier(arch="cifar_resnet20", cfg=CFG20, num_classes=10)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=RandomImageDataModule(num_samples=16))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="checkpoint"):
        load_artifact(ckpt)


def test_load_weights_refuses_another_architecture(pruned_pair) -> None:
    dense, pruned = pruned_pair
    art = _make(dense, pruned)
    with pytest.raises(ValueError, match="does not match this CifarResNet") as err:
        load_weights(create_model("cifar_resnet20", num_classes=7), art)
    assert "build_model" in str(err.value)
    other = create_model("cifar_resnet20", cfg=art.architecture.kwargs["cfg"], num_classes=7)
    load_weights(other, art)  # the right shapes load
    with pytest.raises(ValueError, match="does not match"):
        load_weights(create_model("cifar_resnet20", cfg=art.architecture.kwargs["cfg"], num_classes=10), art)


# ---- the typed artifact and its on-disk layout ------------------------------------------------------------
def _hand_written(model: torch.nn.Module) -> dict:
    """An artifact file's contents in the dict layout of format version 1, written without the dataclasses."""
    return {
        "format": "lit-prune-artifact", "version": 1,
        "architecture": {"name": "cifar_resnet20", "kwargs": {"cfg": CFG20, "num_classes": 10}},
        "input_size": [3, 32, 32],
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "masks": {"conv1.weight": torch.ones_like(model.conv1.weight, dtype=torch.bool)},
        "flops": {"dense": {"macs": 4000, "params": 300}, "pruned": {"macs": 1000, "params": 100}, "ratio": 4.0},
        "provenance": {"method": "l1_norm", "settings": {"prune_ratio": 0.5}, "source": "large.ckpt",
                       "created": "2024-01-01T00:00:00+0000", "lit_prune_version": "0.1.0"},
        "init_state": None,
    }


def test_to_dict_from_dict_round_trip(pruned_pair) -> None:
    dense, pruned = pruned_pair
    art = _make(dense, pruned, masks={"conv1.weight": torch.ones_like(pruned.conv1.weight, dtype=torch.bool)},
                init_state=pruned.state_dict())
    d = art.to_dict()
    assert d["format"] == FORMAT and d["version"] == VERSION == 1
    assert set(d) == {"format", "version", "architecture", "input_size", "state_dict", "masks", "flops",
                      "provenance", "init_state"}
    assert d["flops"]["dense"] == Counts.of(dense).to_dict() and d["flops"]["pruned"] == art.flops.pruned.to_dict()
    assert d["flops"]["ratio"] == art.flops.ratio == pytest.approx(Counts.of(dense).macs / art.flops.pruned.macs)
    assert set(d["provenance"]) == {"method", "settings", "source", "created", "lit_prune_version"}
    assert isinstance(d["input_size"], list)
    back = Artifact.from_dict(d)
    assert (back.architecture, back.input_size, back.flops, back.provenance) == (
        art.architecture, art.input_size, art.flops, art.provenance)
    assert back.to_dict().keys() == d.keys()
    for field in ("state_dict", "masks", "init_state"):
        a, b = getattr(art, field), getattr(back, field)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), field


def test_flops_summary_ratio_and_parts() -> None:
    f = FlopsSummary(dense=Counts(macs=300, params=30), pruned=Counts(macs=100, params=10))
    assert f.ratio == 3.0
    assert f.to_dict() == {"dense": {"macs": 300, "params": 30}, "pruned": {"macs": 100, "params": 10}, "ratio": 3.0}
    assert FlopsSummary.from_dict(f.to_dict()) == f
    assert FlopsSummary(dense=Counts(5, 1), pruned=Counts(0, 0)).ratio == 5.0  # nothing left counts as 1
    arch = Architecture(name="cifar_resnet20", kwargs={"cfg": CFG20})
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert arch.build().arch_kwargs()["cfg"] == CFG20
    prov = Provenance(method="l1_norm", settings={"prune_ratio": 0.5})
    assert Provenance.from_dict(prov.to_dict()) == prov


def test_a_file_in_the_dict_layout_loads(tmp_path: Path) -> None:
    """Files written before the typed artifact (the same layout, written by hand here) load as before."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", cfg=CFG20, num_classes=10).eval()
    torch.save(_hand_written(model), tmp_path / "old.pt")
    art = load_artifact(tmp_path / "old.pt")
    assert art.architecture == Architecture(name="cifar_resnet20", kwargs={"cfg": CFG20, "num_classes": 10})
    assert art.input_size == (3, 32, 32) and art.init_state is None
    assert art.flops.dense == Counts(macs=4000, params=300) and art.flops.ratio == 4.0
    assert art.provenance == Provenance(method="l1_norm", settings={"prune_ratio": 0.5}, source="large.ckpt",
                                        created="2024-01-01T00:00:00+0000", lit_prune_version="0.1.0")
    assert set(art.masks) == {"conv1.weight"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "old.pt")(x), model(x), rtol=0, atol=0)
    # and what this lit-prune writes back is the same layout, value for value
    save_artifact(art, tmp_path / "again.pt")
    again, old = torch.load(tmp_path / "again.pt", weights_only=True), _hand_written(model)
    for key in ("format", "version", "architecture", "input_size", "flops", "provenance", "init_state"):
        assert again[key] == old[key], key
    # optional parts an artifact may lack: masks, init_state and input_size
    sparse = {k: v for k, v in _hand_written(model).items() if k not in ("masks", "init_state", "input_size")}
    art = Artifact.from_dict(sparse)
    assert art.masks == {} and art.init_state is None and art.input_size is None


@pytest.mark.parametrize("path, missing", [
    (("flops",), "'flops'"),
    (("architecture", "kwargs"), "its architecture has no 'kwargs'"),
    (("flops", "pruned", "macs"), "its flops.pruned has no 'macs'"),
    (("provenance", "method"), "its provenance has no 'method'"),
    (("state_dict",), "'state_dict'"),
])
def test_a_malformed_artifact_names_what_is_missing(tmp_path: Path, path: tuple[str, ...], missing: str) -> None:
    raw = _hand_written(create_model("cifar_resnet20", cfg=CFG20, num_classes=10))
    part = raw
    for key in path[:-1]:
        part = part[key]
    del part[path[-1]]
    broken = tmp_path / "broken.pt"
    torch.save(raw, broken)
    with pytest.raises(ValueError, match=re.escape(f"{broken} is a malformed lit-prune artifact")) as err:
        load_artifact(broken)
    assert missing in str(err.value)
    with pytest.raises(ValueError, match="malformed"):
        Artifact.from_dict(raw)


def test_from_dict_refuses_what_is_not_an_artifact() -> None:
    with pytest.raises(ValueError, match="not a lit-prune artifact"):
        Artifact.from_dict({"state_dict": {}})
    with pytest.raises(ValueError, match="not a lit-prune artifact"):
        Artifact.from_dict([1, 2])
    with pytest.raises(ValueError, match="format version 2"):
        Artifact.from_dict({"format": FORMAT, "version": 2})
    bad = _hand_written(create_model("cifar_resnet20", cfg=CFG20, num_classes=10))
    bad["masks"] = {"conv1.weight": [True]}
    with pytest.raises(ValueError, match="'masks' is not a dict of tensors"):
        Artifact.from_dict(bad)
