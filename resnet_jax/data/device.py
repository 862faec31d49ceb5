"""Datasets that fit in accelerator memory, stored once on device as uint8.

Each training step gathers its batch through the epoch's permutation and augments it inside
the jitted step: no host work per step. Randomness is a function of (seed, step, position in
the global batch), so a batch is the same whatever the device count, and resume is exact.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.data import IMAGENET_MEAN, IMAGENET_STD, augment
from resnet_jax.data.sources import Arrays


@flax.struct.dataclass
class DeviceData:
    """One split on device, with the normalisation statistics of the training split."""

    images: jax.Array  # uint8 [N, H, W, C]
    labels: jax.Array  # int32 [N]
    mask: jax.Array  # float32 [N]: 0 for padding added so evaluation batches are full
    mean: jax.Array  # float32, [H, W, C] (per pixel) or [C]
    std: jax.Array


def normalization_stats(data: ml_collections.ConfigDict, train: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std to normalise with, from the training images (or ImageNet's constants)."""
    channels = train.images.shape[-1]
    if data.normalization == "per_pixel_mean":  # He et al.: subtract the per-pixel mean
        return train.images.mean(axis=0, dtype=np.float64).astype(np.float32), np.full(channels, 255.0, np.float32) / 4
    if data.normalization == "per_channel":
        pixels = train.images.reshape(-1, channels).astype(np.float64)
        return pixels.mean(0).astype(np.float32), pixels.std(0).astype(np.float32)
    if data.normalization == "imagenet":
        return np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    return np.zeros(channels, np.float32), np.full(channels, 255.0, np.float32)


def host_data(arrays: Arrays, stats: tuple[np.ndarray, np.ndarray], pad_to_multiple: int = 1) -> DeviceData:
    """A DeviceData of numpy arrays (to be placed by `parallel`), padded to a multiple."""
    n = len(arrays.labels)
    padded = -(-n // pad_to_multiple) * pad_to_multiple
    extra = padded - n
    images = np.concatenate([arrays.images, np.zeros((extra, *arrays.images.shape[1:]), np.uint8)])
    labels = np.concatenate([arrays.labels, np.zeros(extra, np.int32)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(extra, np.float32)])
    return DeviceData(images, labels, mask, *stats)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> jax.Array:
    """The data order of one epoch: drawn from (seed, epoch) alone, so resume is exact."""
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.permutation(key, num_examples)


def train_batch(
    data: DeviceData,
    permutation: jax.Array,
    step: jax.Array,
    steps_per_epoch: int,
    per_device_batch: int,
    device_index: jax.Array,
    key: jax.Array,
    padding: int,
    flip: bool,
) -> dict[str, jax.Array]:
    """This device's share of the global batch of `step`, augmented.

    Global batch position p of step s is example permutation[(s % steps_per_epoch) * B + p];
    device d takes positions d * per_device_batch ... (d + 1) * per_device_batch - 1.
    """
    start = (step % steps_per_epoch) * per_device_batch * jax.lax.axis_size("data")
    start = start + device_index * per_device_batch
    indices = jax.lax.dynamic_slice(permutation, (start,), (per_device_batch,))
    images = augment.normalize(data.images[indices], data.mean, data.std)
    positions = device_index * per_device_batch + jnp.arange(per_device_batch)
    keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(positions)
    images = jax.vmap(lambda im, k: augment.augment(im, k, padding, flip))(images, keys)
    return {"image": images, "label": data.labels[indices], "mask": jnp.ones(per_device_batch, jnp.float32)}


def eval_batch(data: DeviceData, batch_index: jax.Array, per_device_batch: int, device_index: jax.Array):
    """This device's share of evaluation batch `batch_index` (padding masked out)."""
    start = (batch_index * jax.lax.axis_size("data") + device_index) * per_device_batch
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, per_device_batch)
    return {
        "image": augment.normalize(take(data.images), data.mean, data.std),
        "label": take(data.labels),
        "mask": take(data.mask),
    }
