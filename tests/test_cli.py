"""The command-line tools: lit_prune.cli.flops and lit_prune.cli.prune (python -m lit_prune.flops, .prune)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lit_prune.artifact import load_artifact
from lit_prune.cli import flops, prune
from lit_prune.core.budget import scratch_b_budget
from lit_prune.core.flops import count_flops
from lit_prune.models import architecture, create_model, get_width_config
from lit_prune.module import ImageClassifier
from tests.helpers import REPO


def test_flops_json_reports_macs_and_params(capsys):
    assert flops.main(["cifar_vgg16", "--width-config", "A", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["macs"] == pytest.approx(2.06e8, rel=0.01)
    assert out["params"] > 0 and out["layers"][0]["name"] == "features.0"


def test_flops_table_lists_layers_and_total(capsys):
    assert flops.main(["cifar_resnet56", "--cfg", "B"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "90,907,264 MACs" in out


def test_flops_list_names_models_and_width_configs(capsys):
    assert flops.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet56  (width configs: A, B)" in out and "slim_preresnet164" in out


def test_flops_errors_are_clear(capsys):
    assert flops.main(["cifar_resnet57"]) == 2
    assert "unknown model 'cifar_resnet57'" in capsys.readouterr().err
    assert flops.main(["cifar_resnet56", "--cfg", "Z"]) == 2
    assert "known: A, B" in capsys.readouterr().err


def _method(tmp_path, text: str):
    path = tmp_path / "method.yaml"
    path.write_text(text)
    return path


def test_prune_cli_from_torchvision_style_weights(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save({f"module.{k}": v for k, v in create_model("cifar_resnet56").state_dict().items()}, weights)
    method = _method(tmp_path, "class_path: callbacks.L1FilterPruning\ninit_args: {target: B}\n")
    out = tmp_path / "r56b.pt"
    assert prune.main(["--arch", "cifar_resnet56", "--weights", str(weights), "--config", str(method),
                       "--out", str(out)]) == 0
    art = load_artifact(out)
    assert art.architecture.kwargs["cfg"] == [6] * 7 + [16, 16, 32] + [22] * 6 + [32, 22, 64] + [57] * 7 + [64]
    assert art.provenance.source == str(weights)
    assert "ratio 1.380" in capsys.readouterr().out
    # the flops CLI reads the artifact back and shows the unpruned size beside it
    assert flops.main([str(out)]) == 0
    assert "FLOPs ratio 1.380 (macs convention; l1_norm)" in capsys.readouterr().out


def test_prune_cli_refuses_bad_input(tmp_path, capsys):
    method = _method(tmp_path, "class_path: callbacks.L1FilterPruning\ninit_args: {target: B}\n")
    assert prune.main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--config", str(method), "--out", "x.pt"]) != 0
    weights = tmp_path / "w.pth"
    torch.save(create_model("cifar_resnet20").state_dict(), weights)
    assert prune.main(["--arch", "cifar_resnet56", "--weights", str(weights), "--config", str(method),
                       "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not match cifar_resnet56" in capsys.readouterr().err
    bad = _method(tmp_path, "class_path: callbacks.NoSuchMethod\n")
    assert prune.main(["--arch", "cifar_resnet56", "--weights", str(weights), "--config", str(bad),
                       "--out", str(tmp_path / "x.pt")]) == 2
    assert "cannot import 'callbacks.NoSuchMethod'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_prune_cli_writes_predefined_architecture(tmp_path, capsys):
    # ResNet-56-B as an architecture-only artifact: fresh init, dense FLOPs of the default cfg, Scratch-B ready
    out = tmp_path / "r56b.pt"
    argv = ["--arch", "cifar_resnet56", "--width-config", "B", "--num-classes", "10", "--out", str(out)]
    assert prune.main(argv) == 0
    art = load_artifact(out)
    assert art.architecture.to_dict() == {"name": "cifar_resnet56",
                                          "kwargs": {"num_classes": 10, "cfg": get_width_config("cifar_resnet56", "B")}}
    assert art.provenance.method == "predefined" and art.provenance.source is None
    assert art.provenance.settings["width_config"] == "B"
    assert "none inherited" in art.provenance.settings["weights"]
    assert art.flops.dense.macs == count_flops(create_model("cifar_resnet56", num_classes=10)).macs
    assert art.flops.ratio == pytest.approx(1.3791, rel=1e-3)
    assert scratch_b_budget(160, art.flops.ratio).epochs == 220  # docs/paper-settings.md §1.3
    assert "ratio 1.380" in capsys.readouterr().out
    # the flops CLI gives the Scratch-B budget of the artifact, with the arguments that run it
    assert flops.main([str(out), "--scratch-b", "160"]) == 0
    printed = capsys.readouterr().out
    assert "Scratch-B: 220 epochs" in printed and "--trainer.max_epochs 220" in printed
    assert "--model.milestones '[110, 165]'" in printed  # docs/paper-settings.md §1.3: ResNet-56-B 220 (110, 165)
    assert flops.main([str(out), "--scratch-b", "90", "--rule", "thirds", "--cap", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scratch_b"]["epochs"] == int(90 * 1.3791)
    assert flops.main([str(out), "--scratch-b", "160", "--rule", "scale"]) == 2
    assert "base_milestones" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flops.main(["cifar_resnet56", "--scratch-b", "160"])
    assert "needs a pruned artifact" in capsys.readouterr().err
    # the Scratch-E/B path: a fresh model of that architecture
    module = ImageClassifier(artifact=str(out), regime="scratch", num_classes=10)
    assert architecture(module.model) == art.architecture.to_dict()
    assert not torch.equal(module.model.conv1.weight, art.state_dict["conv1.weight"])


@pytest.mark.slow
def test_prune_cli_writes_thinet70(tmp_path):
    out = tmp_path / "thinet70.pt"
    assert prune.main(["--arch", "resnet50", "--width-config", "thinet70", "--out", str(out)]) == 0
    art = load_artifact(out)
    assert art.architecture.kwargs["cfg"] == get_width_config("resnet50", "thinet70")
    budget = scratch_b_budget(90, art.flops.ratio, rule="thirds", cap=2.0)
    assert (budget.epochs, budget.milestones) == (141, [47, 94])  # docs/paper-settings.md §1.3: 141 epochs, step 47


def test_prune_cli_width_config_errors(tmp_path, capsys):
    method = _method(tmp_path, "class_path: callbacks.L1FilterPruning\ninit_args: {target: B}\n")
    out = str(tmp_path / "x.pt")
    for argv in (["--arch", "cifar_resnet56", "--out", out],  # neither --config nor --width-config
                 ["--arch", "cifar_resnet56", "--width-config", "B", "--config", str(method), "--out", out],
                 ["--width-config", "B", "--out", out],  # no --arch
                 ["--arch", "cifar_resnet56", "--width-config", "B", "--weights", "w.pth", "--out", out]):
        with pytest.raises(SystemExit) as exc:
            prune.main(argv)
        assert exc.value.code == 2
    assert "exactly one of --config" in capsys.readouterr().err
    assert prune.main(["--arch", "cifar_resnet56", "--width-config", "Z", "--out", out]) == 2
    assert "no width config named 'Z' (known: A, B)" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("command", ["lit_prune.stage", "lit_prune.rethink", "lit_prune.prune", "lit_prune.flops"])
def test_help_prints_without_loading_torch(command: str) -> None:
    """--help answers at once: nothing heavy (torch, Lightning) is imported before the arguments parse."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", command, "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "pytorch_lightning", "lightning"}, sorted(imported & {"torch", "pytorch_lightning"})


def test_fit_help_names_our_callbacks_and_datamodules_not_every_layer(capsys, monkeypatch) -> None:
    from lit_prune.cli.train import main

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    out = "".join(text.split())  # class paths are broken across wrapped lines
    start = out.index("--trainer.callbacksCALLBACKS,")
    callbacks = out[start:out.index("--trainer.", out.index("knownsubclasses", start))]
    assert "lit_prune.callbacks.L1FilterPruning" in callbacks and "lit_prune.callbacks.NetworkSlimming" in callbacks
    assert callbacks.index("lit_prune.") < callbacks.index("pytorch_lightning.callbacks.")  # ours first
    assert "lit_prune.datamodules.CIFARDataModule" in out and "lit_prune.datamodules.MNIST5kDataModule" in out
    assert "torch.nn.Conv2d" not in out and "anytorch.nn.Moduleclasspath" in out
    assert len(text.splitlines()) < 1000  # it was 1,470 lines, 680 of them torch.nn classes


def test_train_py_prints_the_toolkits_errors_without_a_traceback() -> None:
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--model.lr", "-1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: lr must be > 0, got -1.0" in proc.stderr and "Traceback" not in proc.stderr


def _lightning_checkpoint(tmp_path, **model_kwargs):
    import pytorch_lightning as pl

    from tests.helpers import RandomImageDataModule

    module = ImageClassifier(**model_kwargs)
    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, RandomImageDataModule(num_samples=4, batch_size=4))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_flops_counts_the_model_of_a_lightning_checkpoint(tmp_path, capsys):
    cfg = [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32]
    path, module = _lightning_checkpoint(tmp_path, arch="cifar_vgg11", cfg=cfg)
    assert flops.main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["macs"] == count_flops(module.model).macs
    assert out["macs"] < count_flops(create_model("cifar_vgg11")).macs  # its narrow widths, not the default


def test_flops_reference_convention_of_an_artifact(tmp_path, capsys):
    """--convention reference counts BN, ReLU and pools too, and the artifact's ratio and Scratch-B budget in it."""
    art = tmp_path / "a.pt"
    assert prune.main(["--arch", "cifar_vgg16", "--width-config", "A", "--out", str(art)]) == 0
    capsys.readouterr()
    assert flops.main([str(art), "--json", "--scratch-b", "160"]) == 0
    macs = json.loads(capsys.readouterr().out)
    assert flops.main([str(art), "--json", "--scratch-b", "160", "--convention", "reference"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ref["macs"] == macs["macs"] and ref["flops"] > ref["macs"]  # tables keep quoting MACs
    dense = count_flops(create_model("cifar_vgg16"), convention="reference").flops
    assert ref["scratch_b"] == scratch_b_budget(160, dense / ref["flops"]).to_dict()


def test_flops_reference_convention_needs_the_large_widths_of_a_narrow_model(tmp_path, capsys):
    from lit_prune.artifact import make_artifact, save_artifact
    from lit_prune.methods.state import Counts

    large_cfg = [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32]
    large = create_model("cifar_vgg11", cfg=large_cfg)
    pruned = create_model("cifar_vgg11", cfg=[4, "M", 8, "M", 8, 8, "M", 16, 16, "M", 16, 16])
    art = save_artifact(make_artifact(pruned, method="test", dense=Counts.of(large)), tmp_path / "a.pt")
    assert flops.main([str(art), "--convention", "reference"]) == 2
    assert "--large-width-config" in capsys.readouterr().err  # the artifact alone cannot say the large widths
    assert flops.main([str(art), "--convention", "reference", "--json",
                       "--large-width-config", json.dumps(large_cfg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == count_flops(pruned, convention="reference").flops
