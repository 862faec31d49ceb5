"""The ResNet family: a generic stem / stages / head network and its named variants."""

import functools
import numbers
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models.blocks import BOTTLENECK_STRIDES, SHORTCUT_OPTIONS, BasicBlock, Bottleneck

ModuleDef = Any

# He et al.: "we initialize the weights as in [13]" -- Kaiming normal, fan-out, as torchvision.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ResNet(nn.Module):
    """Stem, residual stages, global average pool and a dense classifier.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 3, 3) for ResNet-20, (3, 4, 6, 3) for ResNet-50.
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: size of the classifier.
      widths: filters of each stage (before a bottleneck's 4x expansion).
      stem: "cifar" (3x3 conv, stride 1) or "imagenet" (7x7/2 conv + 3x3/2 max-pool).
      stem_width: filters of the stem convolution.
      shortcut: "A", "B" or "C" (see `blocks.shortcut`).
      skip: False builds the plain twin: the same layers without the additions.
      zero_init_residual: zero scale on the last BN of every residual branch.
      bottleneck_stride: "v1" (stride on the first 1x1) or "v1.5" (on the 3x3).
      dtype: compute dtype; parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BN statistics are averaged (sync BN), or None.
      dropout_rate: dropout before the classifier (0 = none, as in the paper).
      drop_blocks: blocks to delete (Veit et al.'s lesion study), counted from 0 over all
        blocks in order (`block_names()`). A deleted residual block becomes its shortcut; a
        deleted plain block becomes the identity, which only shape-preserving plain blocks
        can (`deletable_blocks()`). The deleted blocks' parameters are ignored, so the full
        model's variables apply unchanged.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    shortcut: str = "B"
    skip: bool = True
    zero_init_residual: bool = False
    bottleneck_stride: str = "v1.5"
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    dropout_rate: float = 0.0
    act: Callable = nn.relu
    drop_blocks: Sequence[int] = ()

    def __post_init__(self):
        if self.zero_init_residual and not self.skip:
            raise ValueError(
                "zero_init_residual needs skip connections: a plain block whose last BN scale "
                "is zero outputs zeros"
            )
        if self.shortcut not in SHORTCUT_OPTIONS:
            raise ValueError(f"unknown shortcut {self.shortcut!r}; choose from {', '.join(SHORTCUT_OPTIONS)}")
        if self.bottleneck_stride not in BOTTLENECK_STRIDES:
            raise ValueError(
                f"unknown bottleneck_stride {self.bottleneck_stride!r}; choose from {', '.join(BOTTLENECK_STRIDES)}"
            )
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {self.stem!r}; choose from cifar, imagenet")
        self._check_drop_blocks()
        super().__post_init__()

    def _layout(self) -> list[tuple[str, bool]]:
        """(name, changes_shape) of every block, in order."""
        layout, channels = [], self.stem_width
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for block in range(num_blocks):
                out = width * self.block_cls.expansion
                strided = stage > 0 and block == 0
                layout.append((f"stage{stage + 1}_block{block + 1}", strided or channels != out))
                channels = out
        return layout

    def block_names(self) -> list[str]:
        """Every block's name ("stage1_block1", ...); `drop_blocks` indexes this list."""
        return [name for name, _ in self._layout()]

    def deletable_blocks(self) -> list[int]:
        """Indices `drop_blocks` accepts: every block of a residual net; a plain net's
        blocks that keep the shape (a strided or widening plain block has no shortcut)."""
        return [i for i, (_, changes) in enumerate(self._layout()) if self.skip or not changes]

    def _check_drop_blocks(self) -> None:
        count, allowed = len(self._layout()), set(self.deletable_blocks())
        for index in self.drop_blocks:
            if not isinstance(index, numbers.Integral) or not 0 <= index < count:
                raise ValueError(f"drop_blocks: {index!r} is not a block index (0 ... {count - 1})")
            if index not in allowed:
                raise ValueError(
                    f"drop_blocks: plain block {index} ({self.block_names()[index]}) changes the shape and "
                    f"has no shortcut to replace it; deletable: {sorted(allowed)}"
                )

    @nn.compact
    def __call__(self, x, train: bool = True):
        # Padding k//2 on every side, as torchvision: stride-2 layers see the same pixels.
        conv = functools.partial(nn.Conv, use_bias=False, padding=1, dtype=self.dtype, kernel_init=he_normal)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            axis_name=self.bn_axis_name if train else None,
        )
        block_extra = {"stride_on": self.bottleneck_stride} if self.block_cls is Bottleneck else {}

        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.stem_width, (7, 7), strides=2, padding=3, name="stem_conv")(x)
            x = self.act(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(self.stem_width, (3, 3), name="stem_conv")(x)
            x = self.act(norm(name="stem_bn")(x))
        self.sow("intermediates", "stem", x)

        dropped, index = set(self.drop_blocks), 0
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for block in range(num_blocks):
                x = self.block_cls(
                    filters=width,
                    strides=2 if stage > 0 and block == 0 else 1,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    shortcut=self.shortcut,
                    skip=self.skip,
                    zero_init_residual=self.zero_init_residual,
                    dropped=index in dropped,
                    name=f"stage{stage + 1}_block{block + 1}",
                    **block_extra,
                )(x)
                index += 1
            self.sow("intermediates", f"stage{stage + 1}", x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------------
# Named variants.

IMAGENET_STAGES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}
CIFAR_NAMED_DEPTHS = (20, 32, 44, 56, 110, 1202)
IMAGENET_PLAIN_DEPTHS = (18, 34)
_NAME = re.compile(r"^(resnet|plain)([1-9]\d*)$")


def available() -> list[str]:
    """The named models. Any CIFAR depth 6n+2 (resnet8, plain26, ...) is accepted too."""
    names = [f"resnet{d}" for d in CIFAR_NAMED_DEPTHS]
    names += [f"plain{d}" for d in CIFAR_NAMED_DEPTHS[:5]]
    names += [f"resnet{d}" for d in IMAGENET_STAGES]
    names += [f"plain{d}" for d in IMAGENET_PLAIN_DEPTHS]
    return names


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: CIFAR models are resnet/plain with depth 6n+2 "
        f"(8, 14, 20, 26, 32, 38, 44, 50, 56, ..., 110, ..., 1202); ImageNet models are "
        f"resnet{{18,34,50,101,152,200}} and plain{{18,34}}. Named: {', '.join(available())}"
    )


def model_family(name: str) -> str:
    """"imagenet" or "cifar" for a model name; ValueError for anything else.

    ImageNet depths win where both match (50, 152 and 200 are also 6n+2): ask for the
    CIFAR net of those depths with `create(name, family="cifar")`.
    """
    match = _NAME.match(name)
    if not match:
        raise _unknown(name)
    kind, depth = match.group(1), int(match.group(2))
    if depth in IMAGENET_STAGES and (kind == "resnet" or depth in IMAGENET_PLAIN_DEPTHS):
        return "imagenet"
    if depth >= 8 and (depth - 2) % 6 == 0:
        return "cifar"
    raise _unknown(name)


def create(name: str, num_classes: int = 10, family: str | None = None, **overrides) -> ResNet:
    """Builds a named model, e.g. `create("resnet56", num_classes=10, dtype=jnp.bfloat16)`.

    Args:
      name: "resnet{depth}" or "plain{depth}"; see `available()`.
      num_classes: classifier size.
      family: "cifar" or "imagenet" to force a family where a depth fits both (e.g. 50).
      **overrides: any `ResNet` attribute (shortcut, zero_init_residual, dtype, ...).

    Raises:
      ValueError: naming the valid choices, for an unknown name or an impossible depth.
    """
    match = _NAME.match(name)
    resolved = family or model_family(name)
    if not match or resolved not in ("cifar", "imagenet"):
        raise _unknown(name)
    depth = int(match.group(2))
    if isinstance(overrides.get("dtype"), str):
        if overrides["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {overrides['dtype']!r}; choose from {', '.join(DTYPES)}")
        overrides["dtype"] = DTYPES[overrides["dtype"]]
    kwargs: dict[str, Any] = dict(num_classes=num_classes, skip=match.group(1) == "resnet")
    if resolved == "cifar":
        if depth < 8 or (depth - 2) % 6:
            raise _unknown(name)
        n = (depth - 2) // 6
        kwargs.update(
            stage_sizes=(n, n, n), block_cls=BasicBlock, widths=(16, 32, 64),
            stem="cifar", stem_width=16, shortcut="A",
        )
    else:
        if depth not in IMAGENET_STAGES:
            raise _unknown(name)
        block_cls, stage_sizes = IMAGENET_STAGES[depth]
        kwargs.update(stage_sizes=stage_sizes, block_cls=block_cls, stem="imagenet", shortcut="B")
    kwargs.update(overrides)
    return ResNet(**kwargs)
