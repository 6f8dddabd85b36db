"""ImageClassifier: schedules, checkpoint round trip, hyper-parameters that rebuild pruned widths."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lit_prune.core.schedule import PiecewiseConstant, milestones_for
from lit_prune.core.surgery import prune_groups
from lit_prune.module import ImageClassifier


def _trainer(tmp_path, epochs: int = 1, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, logger=False, **kw)


def test_paper_schedules():
    assert milestones_for("multistep", 160) == [80, 120]
    assert milestones_for("multistep", 243) == [121, 182]  # Scratch-B of VGG-16-A stretches with max_epochs
    assert milestones_for("step", 90, step_size=30) == [30, 60]
    assert milestones_for("constant", 40) == []
    assert milestones_for("multistep", 1) == []  # not [0, 0]: the LR of a one-epoch run starts where it should
    assert milestones_for("multistep", 2) == [1, 1]
    sfp = PiecewiseConstant([1, 60, 120, 160], [10, 0.2, 0.2, 0.2])  # SFP: 0.01 then 0.1, 0.02, 0.004, 0.0008
    assert [round(0.01 * sfp(e), 6) for e in (0, 1, 59, 60, 120, 160, 199)] == [
        0.01, 0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008]
    with pytest.raises(ValueError, match="one gamma per milestone"):
        PiecewiseConstant([1, 2], [0.1])
    with pytest.raises(ValueError, match="unknown schedule"):
        milestones_for("cosine", 10)


def test_lr_follows_the_schedule_in_a_fit(tmp_path, tiny_data):
    module = ImageClassifier("cifar_resnet20", cfg=[4] * 9, lr=0.1, milestones=[1, 2], gamma=[0.5, 0.1])
    lrs = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, epochs=3, callbacks=[Spy()]).fit(module, tiny_data)
    assert lrs == pytest.approx([0.1, 0.05, 0.005])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="lr must be > 0"):
        ImageClassifier("cifar_resnet20", lr=0)
    with pytest.raises(ValueError, match="unknown schedule"):
        ImageClassifier("cifar_resnet20", schedule="cosine")
    with pytest.raises(ValueError, match="give arch"):
        ImageClassifier()
    with pytest.raises(KeyError, match="unknown model"):
        ImageClassifier("cifar_resnet57")
    with pytest.raises(ValueError, match="unknown regime"):
        ImageClassifier("cifar_resnet20", regime="lottery")


def test_checkpoint_reloads_with_same_predictions_and_weights_only(tmp_path, tiny_data):
    module = ImageClassifier("cifar_resnet20", cfg=[4] * 9, num_classes=10)
    trainer = _trainer(tmp_path)
    trainer.fit(module, tiny_data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["hyper_parameters"]["arch"] == "cifar_resnet20"
    reloaded = ImageClassifier.load_from_checkpoint(path).eval()
    x = tiny_data.x[:8]
    module.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), module(x))


def test_checkpoint_of_a_pruned_model_rebuilds_the_pruned_widths(tmp_path, tiny_data):
    module = ImageClassifier("cifar_resnet20", num_classes=10)
    groups = module.model.channel_groups()
    keeps = {g.name: torch.arange(16 if g.name.startswith("layer1") else 32 if g.name.startswith("layer2") else 64) < 5
             for g in groups}
    prune_groups(module.model, keeps)  # surgery before training, as a stage does
    trainer = _trainer(tmp_path)
    trainer.fit(module, tiny_data)
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    hp = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hp["cfg"] == [5] * 9
    reloaded = ImageClassifier.load_from_checkpoint(path).eval()
    assert reloaded.model.layer1[0].conv1.out_channels == 5
    module.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tiny_data.x[:4]), module(tiny_data.x[:4]))


def test_user_module_trains_without_the_zoo(tmp_path, tiny_data):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 10))
    module = ImageClassifier(model=net, num_classes=10)
    before = net[0].weight.detach().clone()
    _trainer(tmp_path).fit(module, tiny_data)
    assert not torch.equal(before, net[0].weight)
    assert "model" not in module.hparams
