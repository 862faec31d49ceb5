"""A tiny ImageNet-like TFDS dataset for the stream tests: JPEGs of varied sizes, 5 classes.

Importing this module registers the builder `tiny_imagenet_like` with TFDS. Preparing it
(`prepare_tiny(data_dir)`) may import TensorFlow; reading it back with `tfds.data_source`
must not, so the reading side never imports this module (TFDS finds the prepared files in
`data_dir` by name).
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "tiny_imagenet_like"
NUM_CLASSES = 5
SPLIT_SIZES = {"train": 37, "validation": 23}  # not multiples of any batch size used
# (height, width) cycled over examples: landscape, portrait, square, smaller than the crop.
SIZES = ((40, 60), (100, 80), (64, 64), (30, 90), (120, 100), (57, 41))


def _jpeg(height: int, width: int, label: int, rng: np.random.Generator) -> bytes:
    """A smooth colour gradient plus noise; the mean colour depends on the label."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, np.full_like(x, label / NUM_CLASSES)], -1) * 255
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class TinyImagenetLike(tfds.core.GeneratorBasedBuilder):
    """ImageNet's features (JPEG image, label) plus an integer id, in a few dozen examples."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "id": np.int64,
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        offset = 0 if split == "train" else 1000
        for i in range(SPLIT_SIZES[split]):
            height, width = SIZES[i % len(SIZES)]
            label = i % NUM_CLASSES
            # A JPEG, not the decoded array: TFDS stores these bytes as they are.
            yield i, {"image": _jpeg(height, width, label, rng), "label": label, "id": offset + i}


def prepare_tiny(data_dir: str) -> None:
    """Writes the dataset as ArrayRecord under data_dir (imports TensorFlow)."""
    TinyImagenetLike(data_dir=data_dir).download_and_prepare(file_format="array_record")
