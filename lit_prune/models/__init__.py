"""The model zoo: every family of the paper, built by name from a width config.

>>> from lit_prune.models import create_model
>>> model = create_model("cifar_resnet56", cfg="B", num_classes=10)
"""

# importing a family module registers its models and named width configs
from lit_prune.models import (  # noqa: F401  (registers the families)
    cifar_preresnet,
    cifar_resnet,
    densenet,
    imagenet_preact_resnet,
    imagenet_resnet,
    vgg,
)
from lit_prune.models.base import ChannelSelection, ZooModel
from lit_prune.models.external import rebuildable
from lit_prune.models.registry import (
    architecture,
    create_model,
    get_width_config,
    get_width_config_kwargs,
    list_models,
    list_width_configs,
    register_model,
    register_width_config,
)

__all__ = [
    "ChannelSelection",
    "ZooModel",
    "architecture",
    "create_model",
    "get_width_config",
    "get_width_config_kwargs",
    "list_models",
    "list_width_configs",
    "rebuildable",
    "register_model",
    "register_width_config",
]
