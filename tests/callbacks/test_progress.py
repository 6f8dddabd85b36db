"""EpochProgress: one line per epoch, with losses, validation accuracy, learning rate, pace and ETA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from lit_prune.callbacks.progress import PREFIX, EpochProgress, duration
from lit_prune.module import ImageClassifier
from lit_prune.protocol.run import PROGRESS_PREFIX, _ProgressEcho


def test_one_line_per_epoch_with_loss_accuracy_lr_and_eta(tmp_path: Path, tiny_data, caplog) -> None:
    module = ImageClassifier(arch="cifar_resnet20", cfg=[4, 4, 4, 8, 8, 8, 16, 16, 16], num_classes=10,
                             milestones=[1])  # the LR drops from 0.1 to 0.01 after the first epoch
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[EpochProgress()], num_sanity_val_steps=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=tiny_data)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(PREFIX)]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for field in ("train/loss ", "val/loss ", "val/acc1 ", " s/epoch", "ETA "):
        assert all(field in line for line in lines), (field, lines)
    assert [line.split(" | ")[4] for line in lines] == ["lr 0.1", "lr 0.01"]  # the LR each epoch trained with
    assert lines[-1].endswith("ETA 0 s")


def test_durations_read_as_a_person_would() -> None:
    assert [duration(s) for s in (4.4, 59.4, 61, 3725)] == ["4 s", "59 s", "1 min 1 s", "1 h 2 min"]


def test_the_runner_echoes_only_new_progress_lines(tmp_path: Path, capsys) -> None:
    assert PROGRESS_PREFIX == PREFIX  # the runner matches the lines without importing Lightning
    log = tmp_path / "stage.log"
    log.write_text("epoch 9/9 | from an earlier attempt\n")
    echo = _ProgressEcho(log)
    with log.open("a") as f:
        f.write("Lightning banner\nepoch 1/3 | train/loss 2.3 | ETA 8 s\nepoch 2/3 | half a li")
    echo.poll()
    assert capsys.readouterr().out == "    epoch 1/3 | train/loss 2.3 | ETA 8 s\n"
    with log.open("a") as f:
        f.write("ne\n")
    echo.poll()
    assert capsys.readouterr().out == "    epoch 2/3 | half a line\n"
