"""``train.py fit --ckpt_path``: a killed run resumes with ``--ckpt_path last``; another model's checkpoint is refused;
misspelt options are named with their correct spelling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_prune.cli.train import plain_error, run

CFG = [8, 8, 8, 16, 16, 16, 32, 32, 32]


def _args(tmp_path: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["fit", "--model.arch=cifar_resnet20", f"--model.cfg={CFG}", "--data=tests.helpers.RandomImageDataModule",
            "--data.num_samples=16", "--data.batch_size=8", "--trainer.accelerator=cpu",
            f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.logger=pytorch_lightning.loggers.TensorBoardLogger",
            f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=run", *extra]


def test_ckpt_path_last_resumes_the_earlier_run_in_its_own_folder(tmp_path: Path) -> None:
    assert run(_args(tmp_path, epochs=1)) == 0
    first = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 2
    assert run(_args(tmp_path, "--ckpt_path=last", epochs=2)) == 0
    assert not (tmp_path / "run" / "version_1").exists()  # the same run and TensorBoard version, continued
    assert torch.load(first, weights_only=True)["global_step"] == 4  # two more steps, not two from scratch


def test_ckpt_path_last_without_an_earlier_run_fails_loudly(tmp_path: Path, capsys) -> None:
    assert run(_args(tmp_path, "--ckpt_path=last")) == 2
    err = capsys.readouterr().err
    assert "no last.ckpt of an earlier run" in err and str(tmp_path / "run") in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "narrow.ckpt"  # what ImageClassifier.on_save_checkpoint records of a narrow ResNet-20
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": "cifar_resnet20", "cfg": CFG, "model_kwargs": {}}}, ckpt)
    other = ["--model.cfg=null", f"--ckpt_path={ckpt}"]  # the default ResNet-20 widths
    assert run(_args(tmp_path, *other)) == 2
    err = capsys.readouterr().err
    assert "holds a cifar_resnet20 with {'cfg': [8, 8, 8" in err and "trains a cifar_resnet20 with {'cfg': [16" in err
    assert not (tmp_path / "run").exists()  # nothing trained


@pytest.mark.parametrize(("message", "expected"), [
    ("Parser key \"data\":\n  Does not validate against any of the Union subtypes\n  Errors:\n    - Problem with given "
     "class_path 'lit_prune.datamodules.CIFARDataModule':\n        Option 'rot' is not accepted\n",
     "--data.rot: lit_prune.datamodules.CIFARDataModule has no option 'rot'; did you mean 'root'?"),
    ("unrecognized arguments: --model.lrr 0.1", "('--model.lrr': did you mean '--model.lr'?)"),
    ("Subcommand 'fit' does not accept option 'model.weight_decy'", "did you mean 'model.weight_decay'?"),
    ("Subcommand 'fit' does not accept option 'trainer.checkpiont'", None),  # nothing close: no guess
])
def test_misspelt_options_are_named_with_the_closest_spelling(message: str, expected: str | None) -> None:
    options = ["--model.lr", "--model.weight_decay", "--trainer.precision", "--trainer.max_epochs"]
    said = plain_error(message, options)
    if expected is None:
        assert "did you mean" not in said
    else:
        assert expected in said and "Union" not in said
