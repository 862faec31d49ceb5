"""Residual blocks (He et al. 2015) built from injected `conv`, `norm` and `act`.

The blocks never decide dtype, initialisers, padding or BatchNorm mode: the `ResNet` that owns
them passes `functools.partial`s of `nn.Conv` / `nn.BatchNorm`, as in the flax imagenet
example, so those choices are made in exactly one place.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

SHORTCUT_OPTIONS = ("A", "B", "C")
BOTTLENECK_STRIDES = ("v1", "v1.5")


def shortcut(
    x: jnp.ndarray,
    out_channels: int,
    strides: int,
    option: str,
    conv: ModuleDef,
    norm: ModuleDef,
) -> jnp.ndarray:
    """The identity path of a residual block, per He et al.'s options A, B and C.

    A: parameter-free; where the shape changes, subsample by `strides` and zero-pad the
       new channels (split evenly before and after the existing ones).
    B: a 1x1 projection + BN only where the shape changes, identity elsewhere.
    C: a 1x1 projection + BN in every block.
    """
    shape_changes = strides != 1 or x.shape[-1] != out_channels
    if option == "C" or (option == "B" and shape_changes):
        x = conv(out_channels, (1, 1), strides=strides, padding="VALID", name="proj_conv")(x)
        return norm(name="proj_bn")(x)
    if option == "A" and shape_changes:
        x = x[:, ::strides, ::strides, :]
        extra = out_channels - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


def _dropped(block: nn.Module, x: jnp.ndarray, out_channels: int) -> jnp.ndarray:
    """A deleted block (Veit et al.'s lesion): its residual branch is taken out, so it
    outputs act(shortcut(x)), exactly what the block computes when the branch's last BN
    scale and bias are zero (an option-A or identity shortcut of a ReLU output passes x
    through unchanged). A plain block has no shortcut: it becomes the identity, which is
    only possible where it keeps the shape. The branch's parameters are simply not used,
    so the full model's variables still apply."""
    if block.skip:
        return block.act(shortcut(x, out_channels, block.strides, block.shortcut, block.conv, block.norm))
    if block.strides != 1 or x.shape[-1] != out_channels:
        raise ValueError(
            f"cannot delete plain block {block.name}: it changes the shape (stride {block.strides}, "
            f"{x.shape[-1]} -> {out_channels} channels) and a plain net has no shortcut to replace it"
        )
    return x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and every CIFAR ResNet)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str = "A"
    skip: bool = True
    zero_init_residual: bool = False
    dropped: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x):
        if self.dropped:
            return _dropped(self, x, self.filters)
        y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        # Zero scale on the branch's last BN makes a fresh block the identity (Goyal et al.).
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=last_scale, name="bn2")(y)
        if self.skip:
            y = y + shortcut(x, self.filters, self.strides, self.shortcut, self.conv, self.norm)
        return self.act(y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152/200).

    `stride_on` is "v1" (the paper: the first 1x1 strides) or "v1.5" (torchvision: the
    3x3 strides, slightly more accurate and slower).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str = "B"
    skip: bool = True
    zero_init_residual: bool = False
    stride_on: str = "v1.5"
    dropped: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x):
        if self.dropped:
            return _dropped(self, x, self.filters * 4)
        stride_1x1, stride_3x3 = (self.strides, 1) if self.stride_on == "v1" else (1, self.strides)
        y = self.conv(self.filters, (1, 1), strides=stride_1x1, padding="VALID", name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), strides=stride_3x3, name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), padding="VALID", name="conv3")(y)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=last_scale, name="bn3")(y)
        if self.skip:
            y = y + shortcut(x, self.filters * 4, self.strides, self.shortcut, self.conv, self.norm)
        return self.act(y)
