"""Pure jax.numpy augmentations, run inside the jitted step (one image at a time; vmapped)."""

import jax
import jax.numpy as jnp


def normalize(images: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray) -> jnp.ndarray:
    """uint8 -> float32 (x - mean) / std; mean/std broadcast (per pixel [H,W,C] or per channel [C])."""
    return (images.astype(jnp.float32) - mean) / std


def pad_crop(image: jnp.ndarray, key: jax.Array, padding: int) -> jnp.ndarray:
    """Zero-pads `padding` pixels on each side and crops back to the original size at a
    random offset (He et al.: 4-pixel pad, random 32x32 crop). Applied after normalisation,
    so the padding is the mean image, as in the paper."""
    height, width, _ = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[2]))


def random_flip(image: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """Mirrors left-right with probability 1/2."""
    return jnp.where(jax.random.bernoulli(key), image[:, ::-1, :], image)


def augment(image: jnp.ndarray, key: jax.Array, padding: int, flip: bool) -> jnp.ndarray:
    """The training augmentation of one normalised image."""
    crop_key, flip_key = jax.random.split(key)
    if padding:
        image = pad_crop(image, crop_key, padding)
    if flip:
        image = random_flip(image, flip_key)
    return image
