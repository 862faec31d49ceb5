"""The ResNet family: a generic stem / stages / head network and its named variants."""

import functools
import numbers
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models.blocks import (
    ACTIVATION_ORDERS, BOTTLENECK_STRIDES, DEPTH_MODES, SCALE_ON, SHORTCUT_DOWNSAMPLES, SHORTCUT_OPTIONS,
    SHORTCUT_VARIANTS, BasicBlock, Bottleneck, Unit,
)

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
      stem_width: filters of the stem convolution (of the last one in a deep stem).
      deep_stem: the ImageNet stem's 7x7/2 convolution becomes three 3x3 ones of stem_width/2,
        stem_width/2 and stem_width filters, the first at stride 2, each but the last followed
        by BN + ReLU (ResNet-C/D, He et al. 2019; timm's stem_type="deep", stem_width=32).
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
      activation_order: where BN and ReLU sit in every unit (`blocks.ACTIVATION_ORDERS`).
        "full_preact" is the pre-activation (v2) net: its stem is the convolution alone
        (the first unit normalises it), and a final BN + ReLU precedes the pooling;
        "relu_preact" ends with a ReLU. (He et al. 2016, Sec. 4.1 and Fig. 5.)
      shortcut_variant, shortcut_scale, scale_on, gate_bias, shortcut_dropout: the shortcut
        of every unit (`blocks.Unit`; He et al. 2016, Table 1), on the original unit.
      stochastic_depth: 1 - p_L, the drop probability of the last block (0 = off); block
        l of L survives with p_l = 1 - l/L (1 - p_L) (Huang et al., Eq. 4; p_L = 0.5 there).
      stochastic_depth_mode: "batch" (the paper) or "example" (timm's drop_path).
      shortcut_downsample: "stride" or "avgpool" (ResNet-D: a 2x2/2 average pool before the
        projection's 1x1 conv; `blocks.shortcut`).
      se_ratio: squeeze-excitation at the end of every residual branch (Hu et al. 2018; timm's
        seresnet* use 1/16), `blocks.SqueezeExcite`; 0 = none.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    deep_stem: bool = False
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
    activation_order: str = "original"
    shortcut_variant: str = "identity"
    shortcut_scale: float = 1.0
    scale_on: str = "shortcut"
    gate_bias: float = -6.0
    shortcut_dropout: float = 0.0
    stochastic_depth: float = 0.0
    stochastic_depth_mode: str = "batch"
    shortcut_downsample: str = "stride"
    se_ratio: float = 0.0

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
        self._check_unit()
        self._check_bag_of_tricks()
        self._check_drop_blocks()
        super().__post_init__()

    def _check_unit(self) -> None:
        for value, choices, field in ((self.activation_order, ACTIVATION_ORDERS, "activation_order"),
                                      (self.shortcut_variant, SHORTCUT_VARIANTS, "shortcut_variant"),
                                      (self.scale_on, SCALE_ON, "scale_on"),
                                      (self.stochastic_depth_mode, DEPTH_MODES, "stochastic_depth_mode")):
            if value not in choices:
                raise ValueError(f"unknown {field} {value!r}; choose from {', '.join(choices)}")
        if self.shortcut_variant != "identity" and not self.skip:
            raise ValueError(f"shortcut_variant={self.shortcut_variant} needs skip connections: a plain net has no "
                             "shortcut")
        if self.shortcut_variant != "identity" and self.activation_order != "original":
            raise ValueError(f"shortcut_variant={self.shortcut_variant} is an ablation of the original unit "
                             f"(He et al. 2016, Table 1); activation_order={self.activation_order} is not it")
        if self.shortcut_variant == "conv1x1" and self.shortcut != "A":
            raise ValueError(f"shortcut_variant=conv1x1 puts a 1x1 conv on every shortcut; shortcut={self.shortcut} "
                             "would be ignored (use shortcut A)")
        if self.zero_init_residual and self.activation_order == "bn_after_add":
            raise ValueError("zero_init_residual zeroes the last BN of each residual branch; with "
                             "activation_order=bn_after_add the branch ends in a convolution")
        if not 0 <= self.stochastic_depth < 1:
            raise ValueError(f"stochastic_depth (1 - p_L) must be in [0, 1), got {self.stochastic_depth}")
        if self.stochastic_depth and not self.skip:
            raise ValueError("stochastic_depth drops residual branches, leaving the shortcut; a plain net has none")
        if not 0 <= self.shortcut_dropout < 1:
            raise ValueError(f"shortcut_dropout must be in [0, 1), got {self.shortcut_dropout}")

    def _check_bag_of_tricks(self) -> None:
        """The deep stem, the pooled projection and squeeze-excitation, where they mean something."""
        if self.deep_stem and self.stem != "imagenet":
            raise ValueError("the deep stem replaces the ImageNet stem's 7x7 stride-2 convolution; a CIFAR net's "
                             "stem is one 3x3 convolution at stride 1 (use the standard stem)")
        if self.deep_stem and self.stem_width % 2:
            raise ValueError(f"the deep stem's first two convolutions have stem_width/2 filters; stem_width="
                             f"{self.stem_width} is odd")
        if self.shortcut_downsample not in SHORTCUT_DOWNSAMPLES:
            raise ValueError(f"unknown shortcut_downsample {self.shortcut_downsample!r}; choose from "
                             f"{', '.join(SHORTCUT_DOWNSAMPLES)}")
        if self.shortcut_downsample == "avgpool" and not self.skip:
            raise ValueError("shortcut_downsample=avgpool pools before a projection shortcut; a plain net has no "
                             "shortcut")
        if self.shortcut_downsample == "avgpool" and self.shortcut == "A":
            raise ValueError("shortcut_downsample=avgpool pools before a projection's 1x1 convolution; shortcut A "
                             "has none (use shortcut B or C)")
        if not 0 <= self.se_ratio <= 1:
            raise ValueError(f"se_ratio (the squeeze-excitation width over the block's channels; Hu et al.: 1/16) "
                             f"must be in [0, 1], got {self.se_ratio}")

    def survival_probabilities(self) -> list[float]:
        """p_l of every block, in order: 1 - l/L (1 - p_L) (Huang et al., Eq. 4); all 1 when off."""
        count = len(self._layout())
        return [1.0 - (l / count) * self.stochastic_depth for l in range(1, count + 1)]

    def _unit(self, index: int) -> Unit:
        survival = self.survival_probabilities()[index] if self.stochastic_depth else None
        return Unit(order=self.activation_order, variant=self.shortcut_variant, scale=self.shortcut_scale,
                    scale_on=self.scale_on, gate_bias=self.gate_bias, shortcut_dropout=self.shortcut_dropout,
                    survival=survival, depth_mode=self.stochastic_depth_mode, se_ratio=self.se_ratio,
                    shortcut_downsample=self.shortcut_downsample)

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
        # A pre-activation net's stem is the convolution alone: its first unit's BN + ReLU
        # follows (He et al. 2016, Sec. 4.1; timm's resnetv2 stem, preact=True).
        preact = self.activation_order == "full_preact"
        stem_norm = (lambda y: y) if preact else (lambda y: self.act(norm(name="stem_bn")(y)))
        if self.stem == "imagenet":
            x = stem_norm(self._deep_stem(x, conv, norm) if self.deep_stem else
                          conv(self.stem_width, (7, 7), strides=2, padding=3, name="stem_conv")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = stem_norm(conv(self.stem_width, (3, 3), name="stem_conv")(x))
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
                    unit=self._unit(index),
                    first=index == 0,
                    train=train,
                    name=f"stage{stage + 1}_block{block + 1}",
                    **block_extra,
                )(x)
                index += 1
            self.sow("intermediates", f"stage{stage + 1}", x)

        # The last unit's output is a raw sum: "an extra activation right after its
        # element-wise addition" (He et al. 2016, Sec. 4.1).
        if preact:
            x = self.act(norm(name="final_bn")(x))
        elif self.activation_order == "relu_preact":
            x = self.act(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return jnp.asarray(x, jnp.float32)

    def _deep_stem(self, x: jnp.ndarray, conv: ModuleDef, norm: ModuleDef) -> jnp.ndarray:
        """Three 3x3 convolutions (stem_width/2, stem_width/2, stem_width), the first at
        stride 2, BN + ReLU between them; the last one's BN + ReLU is the stem's own
        (stem_bn, or none in a pre-activation net, as timm's resnetv2 deep stem)."""
        widths = (self.stem_width // 2, self.stem_width // 2, self.stem_width)
        for i, width in enumerate(widths, 1):
            x = conv(width, (3, 3), strides=2 if i == 1 else 1, name=f"stem_conv{i}")(x)
            if i < len(widths):
                x = self.act(norm(name=f"stem_bn{i}")(x))
        return x


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
# He et al. 2016's CIFAR pre-activation nets: ResNet-110 (basic, 6n+2), and from 164 layers on
# the bottleneck nets of depth 9n+2 with 16/64/128/256 filters (resnet-pre-act.lua).
PREACT_CIFAR_NAMED_DEPTHS = (20, 56, 110, 164, 1001)
PREACT_BOTTLENECK_MIN_DEPTH = 164
_NAME = re.compile(r"^(resnet|plain|preresnet|preplain)([1-9]\d*)$")
_V2_NAME = re.compile(r"^(resnetv2|plainv2)_([1-9]\d*)$")
# timm's Bag-of-Tricks and squeeze-excitation names: a "d" suffix is ResNet-D (the deep stem and
# pooled projections; its plain twin keeps the stem), an "se" prefix ends every residual branch
# in a squeeze-excitation of Hu et al.'s width, C/16.
_TRICKS_NAME = re.compile(r"^(se)?(resnet|plain)([1-9]\d*)(d?)$")
SE_RATIO = 1 / 16
SE_NAMED_DEPTHS = (18, 34, 50, 101, 152)  # timm's seresnet*


def available() -> list[str]:
    """The named models. Any CIFAR depth 6n+2 (resnet8, plain26, preresnet38, ...) or, for
    pre-activation bottlenecks, 9n+2 from 164 on (preresnet236, ...) is accepted too."""
    names = [f"resnet{d}" for d in CIFAR_NAMED_DEPTHS]
    names += [f"plain{d}" for d in CIFAR_NAMED_DEPTHS[:5]]
    names += [f"resnet{d}" for d in IMAGENET_STAGES]
    names += [f"plain{d}" for d in IMAGENET_PLAIN_DEPTHS]
    names += [f"preresnet{d}" for d in PREACT_CIFAR_NAMED_DEPTHS]
    names += [f"preplain{d}" for d in PREACT_CIFAR_NAMED_DEPTHS[:4]]
    names += [f"resnetv2_{d}" for d in IMAGENET_STAGES]
    names += [f"plainv2_{d}" for d in IMAGENET_STAGES]
    names += [f"resnet{d}d" for d in IMAGENET_STAGES]
    names += [f"seresnet{d}" for d in SE_NAMED_DEPTHS]
    names += ["plain50d", "seplain50"]
    return names


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: CIFAR models are resnet/plain with depth 6n+2 "
        f"(8, 14, 20, 26, 32, 38, 44, 50, 56, ..., 110, ..., 1202) and their pre-activation "
        f"twins preresnet/preplain (6n+2 below 164, bottleneck 9n+2 from 164: 164, 1001); ImageNet "
        f"models are resnet{{18,34,50,101,152,200}}, plain{{18,34}}, and pre-activation "
        f"resnetv2_/plainv2_{{18,34,50,101,152,200}}; ResNet-D resnet/plain{{18,...,200}}d (ImageNet) and "
        f"squeeze-excitation se + any resnet/plain name (seresnet50, seresnet50d, seresnet56). "
        f"Named: {', '.join(available())}"
    )


def _preact_cifar_block(depth: int):
    """(block, blocks per stage) of a CIFAR pre-activation net, or None for a bad depth."""
    if depth >= PREACT_BOTTLENECK_MIN_DEPTH and (depth - 2) % 9 == 0:
        return Bottleneck, (depth - 2) // 9
    if depth >= 8 and (depth - 2) % 6 == 0:
        return BasicBlock, (depth - 2) // 6
    return None


def _tricks(name: str) -> tuple[bool, str, int, bool] | None:
    """(se, "resnet" | "plain", depth, d) of a name with an "se" prefix or a "d" suffix, else None."""
    match = _TRICKS_NAME.match(name)
    if not match or not (match.group(1) or match.group(4)):
        return None
    return bool(match.group(1)), match.group(2), int(match.group(3)), bool(match.group(4))


def model_family(name: str) -> str:
    """"imagenet" or "cifar" for a model name; ValueError for anything else.

    ImageNet depths win where both match (50, 152 and 200 are also 6n+2): ask for the
    CIFAR net of those depths with `create(name, family="cifar")`. preresnet/preplain are
    CIFAR nets, resnetv2_/plainv2_ ImageNet nets; a "d" name is ImageNet's, and an "se" name
    of an ImageNet depth too (seplain50 is the twin of seresnet50, unlike plain50).
    """
    tricks = _tricks(name)
    if tricks:
        _, _, depth, deep = tricks
        if depth in IMAGENET_STAGES:
            return "imagenet"
        if not deep and depth >= 8 and (depth - 2) % 6 == 0:
            return "cifar"
        raise _unknown(name)
    v2 = _V2_NAME.match(name)
    if v2:
        if int(v2.group(2)) in IMAGENET_STAGES:
            return "imagenet"
        raise _unknown(name)
    match = _NAME.match(name)
    if not match:
        raise _unknown(name)
    kind, depth = match.group(1), int(match.group(2))
    if kind.startswith("pre"):
        if _preact_cifar_block(depth):
            return "cifar"
        raise _unknown(name)
    if depth in IMAGENET_STAGES and (kind == "resnet" or depth in IMAGENET_PLAIN_DEPTHS):
        return "imagenet"
    if depth >= 8 and (depth - 2) % 6 == 0:
        return "cifar"
    raise _unknown(name)


def create(name: str, num_classes: int = 10, family: str | None = None, **overrides) -> ResNet:
    """Builds a named model, e.g. `create("resnet56", num_classes=10, dtype=jnp.bfloat16)`.

    Args:
      name: "resnet{depth}", "plain{depth}", "preresnet{depth}", "preplain{depth}",
        "resnetv2_{depth}" or "plainv2_{depth}"; see `available()`. The pre-activation
        names build full pre-activation units (activation_order="full_preact", which an
        override may change: the paper's Table 2 runs every ordering on the same nets).
        timm's names are presets of the same toggles, which overrides may change too:
        "resnet50d" (deep_stem=True, shortcut_downsample="avgpool"; "plain50d" has the stem
        only), "seresnet50" (se_ratio=1/16), "seresnet50d" (both).
      num_classes: classifier size.
      family: "cifar" or "imagenet" to force a family where a depth fits both (e.g. 50).
      **overrides: any `ResNet` attribute (shortcut, zero_init_residual, dtype, ...).

    Raises:
      ValueError: naming the valid choices, for an unknown name or an impossible depth.
    """
    tricks = _tricks(name)
    if tricks:
        se, kind, depth, deep = tricks
        resolved = family or model_family(name)
        fits = {"imagenet": depth in IMAGENET_STAGES, "cifar": not deep and depth >= 8 and (depth - 2) % 6 == 0}
        if not fits.get(resolved):
            raise _unknown(name)
        presets: dict[str, Any] = {"se_ratio": SE_RATIO} if se else {}
        if deep:
            presets.update(deep_stem=True, **({"shortcut_downsample": "avgpool"} if kind == "resnet" else {}))
        return create(f"{kind}{depth}", num_classes, family=resolved, **{**presets, **overrides})
    match = _NAME.match(name) or _V2_NAME.match(name)
    if not match:
        raise _unknown(name)
    kind, depth = match.group(1), int(match.group(2))
    natural = model_family(name)
    resolved = family or natural
    preact = kind.startswith("pre") or kind.endswith("v2")
    if resolved not in ("cifar", "imagenet") or (preact and resolved != natural):
        raise _unknown(name)
    if isinstance(overrides.get("dtype"), str):
        if overrides["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {overrides['dtype']!r}; choose from {', '.join(DTYPES)}")
        overrides["dtype"] = DTYPES[overrides["dtype"]]
    kwargs: dict[str, Any] = dict(num_classes=num_classes, skip=kind.startswith(("resnet", "preresnet")))
    if preact:
        kwargs["activation_order"] = "full_preact"
    if resolved == "cifar" and preact:
        block_cls, n = _preact_cifar_block(depth)
        # The bottleneck nets project where the shape changes (resnet-pre-act.lua).
        kwargs.update(
            stage_sizes=(n, n, n), block_cls=block_cls, widths=(16, 32, 64), stem="cifar", stem_width=16,
            shortcut="A" if block_cls is BasicBlock else "B",
        )
    elif resolved == "cifar":
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
