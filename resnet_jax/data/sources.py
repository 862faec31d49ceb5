"""Where examples come from: TFDS, a local .npz, scikit-learn's digits, or synthetic.

Every source answers `load_split(data_config, split)` with uint8 images [N, H, W, C] and
int32 labels [N], for datasets small enough to hold in memory (the device pipeline).
TFDS slicing (`train[:45000]`, `train[90%:]`) works for every source. Reading never imports
TensorFlow; only `prepare_tfds` (run once per dataset) may.
"""

import os
import re
import zlib
from typing import NamedTuple

import ml_collections
import numpy as np

from resnet_jax.errors import UserError

_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


class Arrays(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]


def slice_split(split: str, arrays: dict[str, Arrays]) -> Arrays:
    """Applies TFDS-style slicing ("train[:45000]", "train[90%:]") to in-memory splits."""
    match = _SLICE.match(split.replace(" ", ""))
    if not match or match.group(1) not in arrays:
        raise UserError(f"unknown split {split!r}; available: {', '.join(sorted(arrays))} (slicing like train[:45000] works)")
    whole = arrays[match.group(1)]
    n = len(whole.labels)

    def bound(text, default):
        if not text:
            return default
        return int(text[:-1]) * n // 100 if text.endswith("%") else int(text)

    part = slice(bound(match.group(2), 0), bound(match.group(3), n))
    out = Arrays(whole.images[part], whole.labels[part])
    if not len(out.labels):
        raise UserError(f"split {split!r} is empty")
    return out


def _npz(data: ml_collections.ConfigDict) -> dict[str, Arrays]:
    if not os.path.isfile(data.path):
        raise UserError(f"data file not found: {data.path}")
    with np.load(data.path) as npz:
        names = [k[2:] for k in npz.files if k.startswith("x_") and f"y_{k[2:]}" in npz.files]
        arrays = {n: Arrays(npz[f"x_{n}"], npz[f"y_{n}"].astype(np.int32)) for n in names}
    if not arrays:
        raise UserError(f"{data.path} holds no x_<split>/y_<split> arrays")
    return arrays


def _digits(data: ml_collections.ConfigDict) -> dict[str, Arrays]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download): a fixed 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int32), test_size=0.2, random_state=0, stratify=digits.target
    )
    return {"train": Arrays(x_train, y_train), "test": Arrays(x_test, y_test)}


def _synthetic(data: ml_collections.ConfigDict, split: str) -> dict[str, Arrays]:
    """Random images and labels of the configured shape: for benchmarks and smoke tests."""
    base = _SLICE.match(split.replace(" ", ""))
    name = base.group(1) if base else split
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n, size = data.synthetic_examples, data.image_size
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, data.num_classes, (n,), dtype=np.int32)
    return {name: Arrays(images, labels)}


def prepare_tfds(name: str, data_dir: str | None) -> None:
    """Downloads and prepares a TFDS dataset as ArrayRecord once (this may import TF)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # TFDS raises DatasetNotFoundError with a long listing
        raise UserError(f"unknown TFDS dataset {name!r}: {str(error).splitlines()[0]}") from None
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")


def _tfds(data: ml_collections.ConfigDict, split: str) -> Arrays:
    import tensorflow_datasets as tfds

    prepare_tfds(data.name, data.data_dir)
    try:
        source = tfds.data_source(data.name, split=split, data_dir=data.data_dir or None, download=False)
    except Exception as error:
        raise UserError(f"cannot read split {split!r} of TFDS dataset {data.name!r}: {str(error).splitlines()[0]}") from None
    records = source.__getitems__(range(len(source)))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    if images.ndim == 3:
        images = images[..., None]
    return Arrays(images, labels)


def load_split(data: ml_collections.ConfigDict, split: str) -> Arrays:
    """Loads one split of `config.data` into host memory.

    Raises:
      UserError: unknown split or dataset, or a missing file.
    """
    if data.source == "tfds":
        return _tfds(data, split)
    if data.source == "npz":
        return slice_split(split, _npz(data))
    if data.source == "digits":
        return slice_split(split, _digits(data))
    if data.source == "synthetic":
        return slice_split(split, _synthetic(data, split))
    raise UserError(f"unknown data.source {data.source!r}")
