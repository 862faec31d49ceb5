"""ResNet models: `create(name, num_classes=...)` builds any of `available()`."""

from resnet_jax.models.blocks import BasicBlock, Bottleneck, shortcut
from resnet_jax.models.resnet import ResNet, available, create, model_family

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "available", "create", "model_family", "shortcut"]
