"""Residual units (He et al. 2015 and 2016) built from injected `conv`, `norm` and `act`.

The blocks never decide dtype, initialisers, padding or BatchNorm mode: the `ResNet` that owns
them passes `functools.partial`s of `nn.Conv` / `nn.BatchNorm`, as in the flax imagenet
example, so those choices are made in exactly one place.

A unit is y = h(x) + F(x), x_next = f(y) (He et al. 2016, "Identity Mappings in Deep
Residual Networks", Eq. 1). `Unit` says where BN and ReLU sit (the orderings of its Fig. 4),
what h is (the shortcut variants of its Fig. 2 / Table 1), whether F is dropped at random
(Huang et al. 2016, "Deep Networks with Stochastic Depth"), whether F ends in a
squeeze-excitation (Hu et al. 2018) and whether a projection shortcut average-pools before its
1x1 convolution (ResNet-D: He et al. 2019, "Bag of Tricks for Image Classification").
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

SHORTCUT_OPTIONS = ("A", "B", "C")
BOTTLENECK_STRIDES = ("v1", "v1.5")
# He et al. 2016, Fig. 4 (a)-(e).
ACTIVATION_ORDERS = ("original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact")
# He et al. 2016, Fig. 2 (a)-(f).
SHORTCUT_VARIANTS = ("identity", "scaling", "exclusive_gating", "shortcut_gating", "conv1x1", "dropout")
SCALE_ON = ("shortcut", "residual", "both")
DEPTH_MODES = ("batch", "example")
# How a projection shortcut downsamples: its 1x1 conv strides (the paper), or a 2x2/2 average
# pool precedes it at stride 1 (ResNet-D; timm's avg_down).
SHORTCUT_DOWNSAMPLES = ("stride", "avgpool")
# Orderings that end a unit with an activation after the addition (f = ReLU, or BN + ReLU).
_ACT_AFTER_ADD = ("original", "bn_after_add")


@dataclasses.dataclass(frozen=True)
class Unit:
    """How a residual unit is wired; the same for every unit of a net except `survival`.

    Attributes:
      order: where BN and ReLU sit (ACTIVATION_ORDERS, He et al. 2016 Fig. 4):
        original        conv-BN-ReLU-conv-BN, add, ReLU
        bn_after_add    conv-BN-ReLU-conv, add, BN-ReLU
        relu_before_add conv-BN-ReLU-conv-BN-ReLU, add
        relu_preact     ReLU-conv-BN-ReLU-conv-BN, add
        full_preact     BN-ReLU-conv-BN-ReLU-conv, add (the v2 unit)
      variant: the shortcut h and the scale of F (SHORTCUT_VARIANTS, Fig. 2), on the
        original unit: identity (h = the net's shortcut option), scaling (lambda on h, on F
        or both), exclusive_gating ((1-g) h + g F), shortcut_gating ((1-g) h + F) with
        g = sigmoid(1x1 conv(x) + b_g), conv1x1 (h = a 1x1 conv in every unit), dropout
        (h = dropout(x)).
      scale: lambda of `scaling`.
      scale_on: "shortcut", "residual" (F) or "both".
      gate_bias: b_g's initial value (Table 1: -6 is the paper's best for both gatings).
      shortcut_dropout: the drop rate of `dropout` (Table 1: 0.5).
      survival: p_l, the probability that F is kept in training (Huang et al.); None = always.
      depth_mode: "batch" (F dropped for the whole mini-batch, Huang et al.) or "example"
        (timm's drop_path: per example, rescaled by 1/p_l in training).
      se_ratio: squeeze-excitation on F's output, before the addition (Hu et al.; timm's
        attn_layer="se"), of width `se_channels(C, se_ratio)`; 0 = none.
      shortcut_downsample: SHORTCUT_DOWNSAMPLES, for the projection shortcuts (B, C).
    """

    order: str = "original"
    variant: str = "identity"
    scale: float = 1.0
    scale_on: str = "shortcut"
    gate_bias: float = -6.0
    shortcut_dropout: float = 0.0
    survival: float | None = None
    depth_mode: str = "batch"
    se_ratio: float = 0.0
    shortcut_downsample: str = "stride"


def shortcut(
    x: jnp.ndarray,
    out_channels: int,
    strides: int,
    option: str,
    conv: ModuleDef,
    norm: ModuleDef | None,
    downsample: str = "stride",
) -> jnp.ndarray:
    """The identity path of a residual block, per He et al.'s options A, B and C.

    A: parameter-free; where the shape changes, subsample by `strides` and zero-pad the
       new channels (split evenly before and after the existing ones).
    B: a 1x1 projection + BN only where the shape changes, identity elsewhere.
    C: a 1x1 projection + BN in every block.
    `norm=None` leaves the BN out: a pre-activation unit projects its already normalised
    input (the authors' resnet-pre-act.lua and timm's DownsampleConv(preact=True)).
    `downsample="avgpool"` (ResNet-D): a projection's 1x1 conv runs at stride 1 after a 2x2
    average pool of stride `strides` (none where `strides` is 1), so it sees every pixel
    rather than one in four; named pooled_proj_conv / pooled_proj_bn (timm's downsample.1/.2).
    """
    shape_changes = strides != 1 or x.shape[-1] != out_channels
    if option == "C" or (option == "B" and shape_changes):
        prefix = "proj"
        if downsample == "avgpool":
            x, strides, prefix = avg_pool_ceil(x, strides), 1, "pooled_proj"
        x = conv(out_channels, (1, 1), strides=strides, padding="VALID", name=f"{prefix}_conv")(x)
        return x if norm is None else norm(name=f"{prefix}_bn")(x)
    if option == "A" and shape_changes:
        x = x[:, ::strides, ::strides, :]
        extra = out_channels - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


def avg_pool_ceil(x: jnp.ndarray, strides: int) -> jnp.ndarray:
    """timm's `nn.AvgPool2d(2, strides, ceil_mode=True, count_include_pad=False)` (NHWC).

    An odd side keeps its last row / column: the window hanging over the edge averages only
    the pixels inside (ceil((H - 2) / s) + 1 outputs), so the size matches the branch's
    padded, strided convolution. `strides=1` is the identity, as in timm.
    """
    if strides == 1:
        return x
    pad = [(0, max(0, (-(-(size - 2) // strides)) * strides + 2 - size)) for size in x.shape[1:3]]
    return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding=pad, count_include_pad=False)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's `layers.helpers.make_divisible`: `value` rounded to the nearest multiple of
    `divisor` (at least `min_value`, default `divisor`), one `divisor` more where that lost
    over (1 - round_limit) of it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def se_channels(channels: int, ratio: float) -> int:
    """The squeeze-excitation width of timm's SEModule: make_divisible(C * ratio, 8,
    round_limit=0), so never below 8 (16 for C = 256 at Hu et al.'s 1/16, 8 for C = 16)."""
    return make_divisible(channels * ratio, 8, round_limit=0.0)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W of x)))), fc1 / fc2 1x1 convs with bias (Hu
    et al. 2018; timm's SEModule, whose names fc1 / fc2 these are).

    Attributes:
      ratio: the bottleneck width over the channels (`se_channels`).
      conv: the net's conv partial (dtype, initialiser); the bias is turned on here.
      act: the activation between the two convs.
    """

    ratio: float
    conv: ModuleDef
    act: Callable

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        y = self.act(self.conv(se_channels(channels, self.ratio), (1, 1), padding="VALID", use_bias=True,
                               name="fc1")(squeezed))
        gate = nn.sigmoid(self.conv(channels, (1, 1), padding="VALID", use_bias=True, name="fc2")(y))
        return x * gate


class _ResidualUnit(nn.Module):
    """The unit of any `Unit` wiring; subclasses list their convolutions (`_convs`).

    Attributes:
      filters: the bottleneck width (the output width of a basic block).
      strides: 2 where a stage starts, else 1.
      shortcut: option "A", "B" or "C".
      skip: False = the plain twin (no shortcut, no addition).
      zero_init_residual: zero scale on the branch's last BN, so a fresh unit is h.
      dropped: a deleted block (Veit et al.'s lesion): F is taken out (F = 0), the rest of
        the unit stays, i.e. f(h(x)); a plain block becomes the identity, which only a
        shape-preserving one can. The branch's parameters are unused.
      first: the net's first unit: a pre-activation unit then normalises before splitting
        (He et al. 2016, Sec. 4.1: "we adopt the first activation right after conv1 and
        before splitting into two paths"), as it does wherever it projects.
      train: training mode (random shortcut dropout and stochastic depth).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str = "A"
    skip: bool = True
    zero_init_residual: bool = False
    dropped: bool = False
    unit: Unit = Unit()
    first: bool = False
    train: bool = False
    expansion = 1

    def _convs(self) -> list[tuple[int, tuple[int, int], int, Any]]:
        """(features, kernel, strides, padding) of each convolution of F, in order."""
        raise NotImplementedError

    def _bn(self, index: int, last: int, name: str) -> nn.Module:
        # Zero scale on the branch's last BN makes a fresh block the identity (Goyal et al.).
        init = nn.initializers.zeros if self.zero_init_residual and index == last else nn.initializers.ones
        return self.norm(scale_init=init, name=name)

    def _residual(self, y: jnp.ndarray) -> jnp.ndarray:
        """F, from its input (already ReLU'd or BN-ReLU'd where the ordering says so)."""
        order, convs = self.unit.order, self._convs()
        last = len(convs)
        for i, (features, kernel, strides, padding) in enumerate(convs, 1):
            if order == "full_preact" and i > 1:
                y = self.act(self._bn(i, last, f"bn{i}")(y))
            y = self.conv(features, kernel, strides=strides, padding=padding, name=f"conv{i}")(y)
            if order == "full_preact":
                continue
            if i < last:
                y = self.act(self._bn(i, last, f"bn{i}")(y))
            elif order != "bn_after_add":
                y = self._bn(i, last, f"bn{i}")(y)
                if order == "relu_before_add":
                    y = self.act(y)
        if self.unit.se_ratio:
            # On F's output, before the addition (after the last BN in the original unit).
            y = SqueezeExcite(self.unit.se_ratio, self.conv, self.act, name="se")(y)
        return y

    def _after_add(self, y: jnp.ndarray) -> jnp.ndarray:
        if self.unit.order == "bn_after_add":
            y = self.norm(name="bn_add")(y)
        return self.act(y) if self.unit.order in _ACT_AFTER_ADD else y

    @nn.compact
    def __call__(self, x):
        unit, out_channels = self.unit, self.filters * self.expansion
        changes = self.strides != 1 or x.shape[-1] != out_channels
        if self.dropped and not self.skip:
            if changes:
                raise ValueError(
                    f"cannot delete plain block {self.name}: it changes the shape (stride {self.strides}, "
                    f"{x.shape[-1]} -> {out_channels} channels) and a plain net has no shortcut to replace it"
                )
            return x
        # The input of F and of h.
        branch_in = shortcut_in = x
        if unit.order == "full_preact":
            last = len(self._convs())
            branch_in = self.act(self._bn(1, last, "bn1")(x))
            projects = self.shortcut == "C" or (self.shortcut == "B" and changes)
            if self.first or projects:
                shortcut_in = branch_in
        elif unit.order == "relu_preact":
            # The first unit's input is the stem's ReLU output, so this ReLU also "comes
            # before splitting" there (ReLU is idempotent).
            branch_in = self.act(x)
        if not self.skip:
            return self._after_add(self._residual(branch_in))

        norm = None if unit.order == "full_preact" else self.norm
        if unit.variant == "conv1x1":
            h = self.conv(out_channels, (1, 1), strides=self.strides, padding="VALID", name="shortcut_conv")(shortcut_in)
        else:
            h = shortcut(shortcut_in, out_channels, self.strides, self.shortcut, self.conv, norm,
                         unit.shortcut_downsample)
        if unit.variant == "dropout":
            h = nn.Dropout(unit.shortcut_dropout, deterministic=not self.train, name="shortcut_dropout")(h)
        residual_scale = None
        if unit.variant == "scaling":
            if unit.scale_on in ("shortcut", "both"):
                h = unit.scale * h
            if unit.scale_on in ("residual", "both"):
                residual_scale = unit.scale
        elif unit.variant in ("exclusive_gating", "shortcut_gating"):
            gate = nn.sigmoid(self.conv(
                out_channels, (1, 1), strides=self.strides, padding="VALID", use_bias=True,
                bias_init=nn.initializers.constant(unit.gate_bias), name="gate")(shortcut_in))
            h = (1.0 - gate) * h
            if unit.variant == "exclusive_gating":
                residual_scale = gate
        if self.dropped:
            return self._after_add(h)

        y = self._stochastic_residual(branch_in, h)
        if residual_scale is not None:
            y = residual_scale * y
        return self._after_add(h + y)

    def _stochastic_residual(self, branch_in: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
        """F(x), kept with probability p_l in training and scaled by p_l in evaluation
        (Huang et al., Eq. 5: the expectation); or timm's drop path (per example, 1/p_l in
        training, as is at test)."""
        survival, mode = self.unit.survival, self.unit.depth_mode
        if survival is None:
            return self._residual(branch_in)
        if not self.train:
            y = self._residual(branch_in)
            return y if mode == "example" else survival * y
        if mode == "example":
            y = self._residual(branch_in)
            keep = jax.random.bernoulli(self.make_rng("dropout"), survival, (y.shape[0],) + (1,) * (y.ndim - 1))
            return y * keep.astype(y.dtype) / jnp.asarray(survival, y.dtype)
        # One draw for the whole (global) mini-batch, from the "depth" stream that is the
        # same on every device; a dropped F is not computed at all (lax.cond), so, as in the
        # authors' Torch code, its BN statistics are not updated and it costs no time.
        keep = jax.random.bernoulli(self.make_rng("depth"), survival)
        if self.is_mutable_collection("intermediates"):
            # An analysis capturing intermediates (the gradient-flow probe): lax.cond cannot
            # return them from one branch only, so F is computed and masked (its BN
            # statistics then update even when dropped; the trainer captures none).
            return jnp.where(keep, self._residual(branch_in), jnp.zeros_like(h))
        return nn.cond(keep, lambda mdl, v: mdl._residual(v), lambda mdl, v: jnp.zeros_like(h), self, branch_in)


class BasicBlock(_ResidualUnit):
    """Two 3x3 convolutions (ResNet-18/34 and every CIFAR ResNet of depth 6n+2)."""

    shortcut: str = "A"
    expansion = 1

    def _convs(self):
        return [(self.filters, (3, 3), self.strides, 1), (self.filters, (3, 3), 1, 1)]


class Bottleneck(_ResidualUnit):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152/200, CIFAR ResNet-164/1001).

    `stride_on` is "v1" (the paper, and the authors' resnet-pre-act.lua: the first 1x1
    strides) or "v1.5" (torchvision and timm: the 3x3 strides).
    """

    shortcut: str = "B"
    stride_on: str = "v1.5"
    expansion = 4

    def _convs(self):
        stride_1x1, stride_3x3 = (self.strides, 1) if self.stride_on == "v1" else (1, self.strides)
        return [(self.filters, (1, 1), stride_1x1, "VALID"), (self.filters, (3, 3), stride_3x3, 1),
                (self.filters * 4, (1, 1), 1, "VALID")]
