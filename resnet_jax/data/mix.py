"""Mixup and CutMix inside the jitted train step, on a batch already on the device.

timm's `Mixup` in its "batch" mode: with probability `data.mix_prob` a batch is mixed, by
CutMix with probability `data.mix_switch_prob` when both are on, with one lambda for the
whole batch drawn from Beta(alpha, alpha). CutMix pastes a box whose side is
sqrt(1 - lambda) of the image's, centred uniformly at random and clipped to the image, and
lambda becomes the share of the image left unpasted (timm's `correct_lam`). The targets
become lambda * one_hot(own label) + (1 - lambda) * one_hot(partner's label); label
smoothing is applied afterwards by the loss (resnet_jax.steps), which equals timm's
smoothing of each one-hot before mixing because both are linear.

The partner. timm mixes example i with example B-1-i of its batch. Under data parallelism
each device mixes its own part of the global batch, so that pairing would change with the
number of devices (on 1 device example 0 meets the last one of the global batch, on 2 the
last one of the first half), and this project's runs give the same result on 1 or N
devices. Here example 2k meets example 2k+1: with an even per-device batch (the config
refuses anything else) the pairs are the same on any device count, since a device's part
starts at an even global position. The data is shuffled, so a neighbour is as random a
partner as timm's mirror image: each example meets exactly one other, both ways.

The draws come from one key that is the same on every device (the trainer derives it from
(seed, step)), so lambda and the box are the same everywhere and resume is exact. When
mixing is off (`config.mixing_enabled` is False, decided in Python) none of this is traced: no extra random draws.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax import config as config_lib


class Mix(NamedTuple):
    """One batch's mixing: the weight of each example's own label, CutMix or Mixup, the box."""

    lam: jax.Array  # float32 scalar: 1 = the batch is left as it is
    cutmix: jax.Array  # bool scalar
    # int32 (top, bottom, left, right): rows [top, bottom) and columns [left, right) are
    # pasted from the partner; drawn on every batch, used only where `cutmix`.
    box: tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def partner(x: jax.Array) -> jax.Array:
    """`x` (examples first) with the examples of each pair 2k, 2k+1 swapped."""
    return x.reshape(x.shape[0] // 2, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)


def cutmix_box(lam: jax.Array, center_y: jax.Array, center_x: jax.Array, height: int, width: int):
    """timm's `rand_bbox` and `cutmix_bbox_and_lam` (no margin, correct_lam=True) for a box
    centred at (center_y, center_x).

    Returns:
      ((top, bottom, left, right), lambda corrected to the clipped box: the share of the
      image outside it).
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (jnp.floor(height * ratio).astype(jnp.int32), jnp.floor(width * ratio).astype(jnp.int32))
    top, bottom = jnp.clip(center_y - cut_h // 2, 0, height), jnp.clip(center_y + cut_h // 2, 0, height)
    left, right = jnp.clip(center_x - cut_w // 2, 0, width), jnp.clip(center_x + cut_w // 2, 0, width)
    area = (bottom - top) * (right - left)
    # (H*W - area) / (H*W): one rounding, so the label weight is the unpasted share exactly.
    corrected = (height * width - area).astype(jnp.float32) / (height * width)
    return (top, bottom, left, right), corrected


def draw(key: jax.Array, data: ml_collections.ConfigDict, height: int, width: int) -> Mix:
    """timm's `Mixup._params_per_batch`, and the CutMix box, from `key`."""
    apply_key, switch_key, beta_key, y_key, x_key = jax.random.split(key, 5)
    if data.mixup_alpha > 0 and data.cutmix_alpha > 0:
        cutmix = jax.random.uniform(switch_key) < data.mix_switch_prob
    else:
        cutmix = jnp.asarray(data.cutmix_alpha > 0)
    # Both lambdas in one draw (an alpha of 0 is never used: 1 stands in): Beta's sampler is a
    # rejection loop that XLA takes seconds to compile, once rather than twice.
    alphas = jnp.asarray([data.mixup_alpha or 1.0, data.cutmix_alpha or 1.0], jnp.float32)
    lam_mixup, lam_cutmix = jax.random.beta(beta_key, alphas, alphas)
    center_y, center_x = jax.random.randint(y_key, (), 0, height), jax.random.randint(x_key, (), 0, width)
    box, lam_box = cutmix_box(lam_cutmix, center_y, center_x, height, width)
    lam = jnp.where(cutmix, lam_box, lam_mixup)
    applied = jax.random.uniform(apply_key) < data.mix_prob
    return Mix(jnp.where(applied, lam, 1.0).astype(jnp.float32), cutmix & applied, box)


def apply(batch: dict, mix: Mix, num_classes: int) -> dict:
    """This device's part of the batch, mixed by `mix`.

    Returns:
      The batch with mixed "image"s, soft "target"s [B, num_classes] (lambda on the own
      label, 1 - lambda on the partner's) and as "label" the dominant one (weight >= 1/2),
      which the training error is measured against.
    """
    images, labels = batch["image"], batch["label"]
    other_images, other_labels = partner(images), partner(labels)
    top, bottom, left, right = mix.box
    rows, cols = jnp.arange(images.shape[1])[:, None], jnp.arange(images.shape[2])[None, :]
    in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    pasted = jnp.where(in_box[None, :, :, None], other_images, images)
    blended = (mix.lam * images.astype(jnp.float32)
               + (1.0 - mix.lam) * other_images.astype(jnp.float32)).astype(images.dtype)
    mixed = jnp.where(mix.cutmix, pasted, jnp.where(mix.lam < 1.0, blended, images))
    targets = (mix.lam * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
               + (1.0 - mix.lam) * jax.nn.one_hot(other_labels, num_classes, dtype=jnp.float32))
    dominant = jnp.where(mix.lam >= 0.5, labels, other_labels)
    return {**batch, "image": mixed, "label": dominant, "target": targets}


def mix_batch(batch: dict, key: jax.Array, data: ml_collections.ConfigDict, num_classes: int) -> dict:
    """`apply(batch, draw(key, ...))`: `key` must be the same on every device."""
    return apply(batch, draw(key, data, batch["image"].shape[1], batch["image"].shape[2]), num_classes)


def describe(data: ml_collections.ConfigDict) -> str | None:
    """The run's log line about mixing (None when off)."""
    if not config_lib.mixing_enabled(data):
        return None
    kinds = [f"{name} alpha {alpha:g}" for name, alpha in (("mixup", data.mixup_alpha), ("cutmix", data.cutmix_alpha))
             if alpha > 0]
    switch = f", cutmix for {100 * data.mix_switch_prob:g} % of them" if len(kinds) == 2 else ""
    return (f"mixing: {' and '.join(kinds)} on {100 * data.mix_prob:g} % of the batches{switch} (one lambda a batch, "
            "example 2k with 2k+1 of each device's part); train loss is on the mixed targets and train err "
            "against each example's dominant label (weight >= 0.5)")
