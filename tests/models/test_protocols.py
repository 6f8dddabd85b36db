"""Every zoo model declares its structure through the protocols core reads (lit_prune.core.protocols)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from lit_prune.core.gates import BlockGate, fold_gates_
from lit_prune.core.protocols import (
    ChannelSamplers,
    CompactsBlocks,
    DeclaresChannelGroups,
    GatedBlock,
    ResidualBlock,
    ZooModel,
    is_zoo_model,
)
from lit_prune.core.reconstruct import add_channel_samplers
from lit_prune.models import architecture, create_model, list_models
from lit_prune.models import base as zoo_base
from lit_prune.models.cifar_resnet import CifarResNet
from lit_prune.models.imagenet_preact_resnet import PreActResNet
from lit_prune.models.imagenet_resnet import ImageNetResNet

RESIDUAL = [n for n in list_models() if "resnet" in n]


def _takes(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(type(model).__init__).parameters


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_satisfies_its_protocols(name: str) -> None:
    model = create_model(name)
    assert is_zoo_model(model) and isinstance(model, ZooModel) and isinstance(model, DeclaresChannelGroups)
    assert isinstance(model, CompactsBlocks) == isinstance(model, PreActResNet)
    assert isinstance(model, ChannelSamplers) == isinstance(model, ImageNetResNet)
    blocks = [m for m in model.modules() if isinstance(m, zoo_base.ResidualBlock)]
    assert bool(blocks) == (name in RESIDUAL)  # every ResNet family has residual blocks, no other family
    for block in blocks:  # each one is a core ResidualBlock whose branch ends in a conv
        assert isinstance(block, ResidualBlock)
        assert isinstance(getattr(block, block.branch_end), nn.Conv2d)
        a, b = block.branch_affine()
        assert a.shape == b.shape == (getattr(block, block.branch_end).out_channels,)
    # modules that are not residual blocks do not pass for one
    assert not any(isinstance(m, ResidualBlock) for m in model.modules() if not isinstance(m, zoo_base.ResidualBlock))


@pytest.mark.parametrize("name", RESIDUAL)
def test_gated_blocks_name_where_their_factor_folds(name: str) -> None:
    model = create_model(name)
    if not _takes(model, "gates"):  # a family without SSS factors (the CIFAR pre-activation ResNets)
        assert not any(isinstance(m, GatedBlock) for m in model.modules())
        return
    model = create_model(name, gates=True)
    gated = [m for m in model.modules() if any(isinstance(c, BlockGate) for c in m.children())]
    assert gated
    for block in gated:
        assert isinstance(block, GatedBlock)
        assert isinstance(getattr(block, block.gate_folds_into), (nn.modules.batchnorm._BatchNorm, nn.Conv2d))
    fold_gates_(model)
    assert "gates" not in architecture(model)["kwargs"]
    assert not any(isinstance(m, BlockGate) for m in model.modules())


def test_a_zoo_class_built_directly_is_not_a_zoo_model() -> None:
    assert not is_zoo_model(CifarResNet(20))
    assert not is_zoo_model(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(TypeError, match="create_model"):
        architecture(CifarResNet(20))


def test_channel_samplers_are_described_as_data() -> None:
    model = create_model("resnet34", num_classes=10)
    assert add_channel_samplers(model) == len(model.blocks())
    assert add_channel_samplers(model) == 0  # every block has one now
    arch = architecture(model)
    assert arch["kwargs"]["select"] == [None] * len(model.blocks())
    rebuilt = create_model(arch["name"], **arch["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # the selections come back from data
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="channel_sampler needs an ImageNet ResNet"):
        add_channel_samplers(create_model("bearpaw_resnet50"))
