"""Where examples come from: TFDS, a local .npz, scikit-learn's digits, or synthetic.

Every source answers `load_split(data_config, split)` with uint8 images [N, H, W, C] and
int32 labels [N], for datasets small enough to hold in memory (the device pipeline).
TFDS slicing (`train[:45000]`, `train[90%:]`) works for every source. Reading never imports
TensorFlow; only `prepare_tfds` (run once per dataset) may.
"""

import logging
import os
import re
import socket
import sys
import urllib.parse
import zlib
from typing import NamedTuple

import ml_collections
import numpy as np

from resnet_jax.errors import UserError

_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


class Arrays(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]


def base_split(split: str) -> str:
    """"train[:45000]" -> "train"."""
    match = _SLICE.match(split.replace(" ", ""))
    return match.group(1) if match else split


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


def _npz(data: ml_collections.ConfigDict, split: str) -> dict[str, Arrays]:
    if not os.path.isfile(data.path):
        raise UserError(f"data file not found: {data.path}")
    try:
        with np.load(data.path) as npz:
            names = [k[2:] for k in npz.files if k.startswith("x_") and f"y_{k[2:]}" in npz.files]
            raw = {n: (npz[f"x_{n}"], npz[f"y_{n}"]) for n in names}
    except Exception as error:  # not a zip, truncated, pickled objects: numpy raises many kinds
        raise UserError(f"cannot read {data.path} as an .npz of arrays ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); write it with "
                        "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    if not raw:
        raise UserError(f"{data.path} holds no x_<split>/y_<split> arrays")
    # Only the requested split is validated (with its own array names in the message).
    base = _SLICE.match(split.replace(" ", ""))
    return {n: (validated(images, labels, data, f"x_{n}", f"y_{n}") if base and base.group(1) == n
                else Arrays(images, labels)) for n, (images, labels) in raw.items()}


def validated(images: np.ndarray, labels: np.ndarray, data: ml_collections.ConfigDict,
              image_name: str = "images", label_name: str = "labels") -> Arrays:
    """Checks one split's arrays and brings them to uint8 [N, H, W, C] and int32 [N].

    Accepts [N, H, W] images (adds a channel axis), integer pixels within 0..255, and float
    images when `data.float_image_max` says what a white pixel is (1.0 or 255.0).

    Raises:
      UserError: naming the array and the fix.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(f"{image_name} has shape {list(images.shape)}; images must be [N, H, W, C] or [N, H, W]")
    if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        raise UserError(f"{image_name} looks channels-first {list(images.shape)}; store [N, H, W, C] "
                        f"(numpy: x.transpose(0, 2, 3, 1))")
    if np.issubdtype(images.dtype, np.floating):
        if not data.float_image_max > 0:
            raise UserError(f"{image_name} holds {images.dtype} images; store uint8 pixels 0..255, or set "
                            "--config.data.float_image_max=1.0 (or 255.0) to say what a white pixel is")
        images = np.clip(np.rint(images * (255.0 / data.float_image_max)), 0, 255).astype(np.uint8)
    elif images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or (images.size and (images.min() < 0 or images.max() > 255)):
            raise UserError(f"{image_name} holds {images.dtype} values outside 0..255; store uint8 pixels")
        images = images.astype(np.uint8)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UserError(f"{label_name} has shape {list(labels.shape)} (one-hot?); store class indices [N] "
                        "(numpy: y.argmax(1))")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{label_name} holds {labels.dtype} values; store integer class indices")
    if len(labels) != len(images):
        raise UserError(f"{image_name} has {len(images)} images but {label_name} has {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= data.num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise UserError(f"{label_name} holds label {bad}, outside [0, {data.num_classes}) of data.num_classes="
                        f"{data.num_classes}; fix the labels or set --config.data.num_classes")
    return Arrays(images, labels.astype(np.int32))


def check_consistent(data: ml_collections.ConfigDict, train: Arrays, evals: dict[str, Arrays]) -> None:
    """Every eval split has the training images' shape, and data.image_size matches them.

    Raises:
      UserError: naming the split and the fix.
    """
    shape = train.images.shape[1:]
    if shape[0] != data.image_size or shape[1] != data.image_size:
        raise UserError(f"the training images are {shape[0]}x{shape[1]} but data.image_size={data.image_size}; "
                        f"set --config.data.image_size={shape[0]}" if shape[0] == shape[1] else
                        f"the training images are {shape[0]}x{shape[1]}, not square; crop or pad them to a square")
    for name, arrays in evals.items():
        if arrays.images.shape[1:] != shape:
            raise UserError(f"eval split {name!r} has images of shape {list(arrays.images.shape[1:])}, the training "
                            f"images {list(shape)}; resize them to the training size")


def _digits(data: ml_collections.ConfigDict) -> dict[str, Arrays]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download): a fixed 80/20 split."""
    # scikit-learn's dataset modules: only this source needs them.
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


OFFLINE_FIX = "connect to the internet once, or use --config.data.source=npz --config.data.path=FILE"


def prepare_tfds(name: str, data_dir: str | None) -> None:
    """Downloads and prepares a TFDS dataset as ArrayRecord once (this may import TF).

    TFDS writes into a temporary directory and renames it when complete, so a download or
    preparation that was interrupted leaves nothing that `is_prepared()` accepts: the next
    call simply prepares again.

    Raises:
      UserError: unknown dataset; no network; a dataset that must be downloaded by hand.
    """
    import tensorflow_datasets as tfds  # TensorFlow behind it: only TFDS sources pay for it

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "Variant folder ... has no dataset_info.json" before our line
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        prepared = builder.is_prepared()
    except Exception as error:  # TFDS raises DatasetNotFoundError with a long listing
        raise UserError(f"unknown TFDS dataset {name!r}: {str(error).splitlines()[0]}") from None
    finally:
        absl_logger.setLevel(level)
    if prepared:
        return
    root = data_dir or tfds.core.constants.DATA_DIR
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
        _check_manual_files(name, root, instructions)
    else:
        _announce_download(name, builder, root)
    try:
        builder.download_and_prepare(file_format="array_record")
    except (OSError, ConnectionError) as error:  # requests' ConnectionError is an OSError
        raise UserError(f"cannot download {name} ({_first_line(error)}): {OFFLINE_FIX}") from None
    except AssertionError as error:  # TFDS asserts on a missing or incomplete manual_dir
        raise UserError(f"cannot prepare {name}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _check_manual_files(name: str, root: str, instructions: str) -> None:
    """Datasets such as ImageNet cannot be downloaded by TFDS: say where their files go."""
    manual_dir = os.path.join(os.path.expanduser(root), "downloads", "manual")
    if os.path.isdir(manual_dir) and os.listdir(manual_dir):
        return
    what = " ".join(instructions.split())
    raise UserError(f"{name} must be downloaded by hand: {what} Put the files in {manual_dir} (set "
                    f"--config.data.data_dir to choose another root) and run again, or prepare it once with "
                    f"`tfds build {name} --data_dir={root} --manual_dir={manual_dir} --file_format=array_record`")


def _announce_download(name: str, builder, root: str) -> None:
    """Says once how large the download is and where it goes, then checks the network is
    there (TFDS alone retries a missing network for minutes before it gives up)."""
    urls = list(builder.url_infos or {})
    size = sum(int(info.size or 0) for info in (builder.url_infos or {}).values())
    shown = f"{size / 2**20:,.0f} MiB" if size else "an unknown size"
    hosts = sorted({urllib.parse.urlparse(u).hostname for u in urls if u.startswith("http")})
    print(f"preparing {name} once: downloading {shown} from {', '.join(hosts) or 'its source'} into "
          f"{os.path.join(root, 'downloads')}, then writing {builder.data_dir}", file=sys.stderr, flush=True)
    for host in hosts:
        if not _reachable(host):
            raise UserError(f"cannot download {name} (cannot reach {host}): {OFFLINE_FIX}")


def _reachable(host: str, timeout_s: float = 10.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _tfds(data: ml_collections.ConfigDict, split: str) -> Arrays:
    import tensorflow_datasets as tfds  # TensorFlow behind it: only TFDS sources pay for it

    prepare_tfds(data.name, data.data_dir)
    try:
        source = tfds.data_source(data.name, split=split, data_dir=data.data_dir or None, download=False)
    except Exception as error:
        raise UserError(f"cannot read split {split!r} of TFDS dataset {data.name!r}: {str(error).splitlines()[0]}") from None
    records = source.__getitems__(range(len(source)))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return Arrays(images, labels)


def split_names(data: ml_collections.ConfigDict) -> set[str] | None:
    """The splits an .npz source holds (x_<split> with y_<split>, unsliced); None for other
    sources, or a file that cannot be read (loading it then says why)."""
    if data.source != "npz":
        return None
    try:
        with np.load(data.path) as npz:
            return {k[2:] for k in npz.files if k.startswith("x_") and f"y_{k[2:]}" in npz.files}
    except Exception:  # missing or not an .npz: load_split reports it
        return None


def load_split(data: ml_collections.ConfigDict, split: str, role: str = "") -> Arrays:
    """Loads one split of `config.data` into host memory, validated (see `validated`).

    Args:
      role: what the split is for ("training", "eval split 'test'"), named in errors.

    Raises:
      UserError: unknown split or dataset, a missing or unreadable file, bad arrays.
    """
    try:
        return _load_split(data, split)
    except UserError as error:
        if role and not str(error).startswith("data file not found"):
            raise UserError(f"{role} ({split}): {error}") from None
        raise


def _load_split(data: ml_collections.ConfigDict, split: str) -> Arrays:
    if data.source == "tfds":
        arrays = _tfds(data, split)
        return validated(arrays.images, arrays.labels, data)
    if data.source == "npz":
        return slice_split(split, _npz(data, split))
    if data.source == "digits":
        return slice_split(split, _digits(data))
    if data.source == "synthetic":
        return slice_split(split, _synthetic(data, split))
    raise UserError(f"unknown data.source {data.source!r}")
