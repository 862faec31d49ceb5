"""Streamed input for datasets that do not fit on the accelerator (ImageNet): grain over TFDS.

Examples are read with `tfds.data_source` (ArrayRecord, random access) with the JPEG bytes left
encoded; grain worker processes decode them (simplejpeg: libjpeg-turbo; Pillow for the odd
file), decoding only as many pixels as the crop needs (JPEG DCT scaling, `decode`), crop and
resize them (Pillow's antialiased bilinear, or OpenCV's plain bilinear, `crop_resize`), and
ship uint8: the pipeline normalises on the device. Reading never
imports TensorFlow (TFDS's own image decoder would not either, but we want the encoded bytes
so decode and crop are one step we control); only `prepare` does, lazily.

One grain element is one whole host batch, a pure function of its batch index:

* train: the order of epoch e is a permutation of the split drawn from (seed, e); global batch
  b of the epoch is rows [b*G, (b+1)*G) of it, and the last n % G rows of every epoch are
  dropped (a different few each epoch). Epoch e has n // G batches, batch j of the stream is
  batch j % (n // G) of epoch j // (n // G). The crop and flip of an example are drawn from
  (seed, epoch, record index).
* eval: global batch j is records [j*G, (j+1)*G) in split order; rows past the end are padding
  (zero image, label 0, mask 0), so there are ceil(n / G) batches on every host.

Host p of P takes rows [p*L, (p+1)*L) of every global batch (L = G / P). So the hosts' shards
are disjoint and together cover each global batch, every host yields the same number of
batches (no collective waits on a host that ran out), and the global stream is the same for any
process_count and any number of workers. The iterator state is just the next batch index, so a
resumed run continues with exactly the batches an uninterrupted one would give.
"""

import io
import math
import sys
import time
from typing import Any

import cv2
import grain
from absl import flags
import numpy as np
from PIL import Image
import simplejpeg

from resnet_jax import data as data_constants
from resnet_jax.errors import UserError

IMAGENET_MEAN = np.array(data_constants.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.array(data_constants.IMAGENET_STD, np.float32)
NORMALIZATIONS = ("imagenet", "none")
_INFINITE = sys.maxsize  # grain's range needs a stop; training never reaches it
cv2.setNumThreads(1)  # OpenCV's own threads would only contend: the workers are the parallelism


def _open(name: str, split: str, data_dir: str):
    """The split as a random-access source of records with the image still encoded.

    download=False: reading must never start preparing (that would import TensorFlow).
    """
    import tensorflow_datasets as tfds  # heavy (TensorFlow behind it): only to find the files

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as error:  # TFDS raises several types for "not prepared" / bad split
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read TFDS {name!r} split {split!r} from data_dir="
                        f"{data_dir or 'default'!r} as ArrayRecord ({reason}); prepare it first "
                        "with resnet_jax.data.sources.prepare_tfds") from None


def normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) the streamed images are normalised with: ImageNet's, or scaling to [0, 1]."""
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return np.zeros(3, np.float32), np.full(3, 255.0, np.float32)


def num_examples(name: str, split: str, data_dir: str = "") -> int:
    """Number of examples in a prepared split (TFDS slicing such as "train[:10%]" works)."""
    return len(_open(name, split, data_dir))


def _random_resized_crop(width: int, height: int, rng: np.random.Generator):
    """Inception crop box (left, top, w, h): torchvision's RandomResizedCrop.get_params
    (scale (0.08, 1), log-uniform ratio (3/4, 4/3), 10 tries, then a center crop)."""
    area, log_ratio = width * height, (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest center crop whose aspect ratio is within [3/4, 4/3].
    w, h = width, height
    if width / height < 3 / 4:
        h = int(round(width / (3 / 4)))
    elif width / height > 4 / 3:
        w = int(round(height * (4 / 3)))
    return (width - w) // 2, (height - h) // 2, w, h


def eval_box(width: int, height: int, size: int, eval_resize: int) -> tuple[float, float, float, float]:
    """The box (left, top, w, h) of the original that resizing the shorter side to
    `eval_resize` and taking the center `size` x `size` keeps; resized in one step (cheaper,
    and the same up to rounding)."""
    w = h = size * min(width, height) / eval_resize
    return (width - w) / 2, (height - h) / 2, w, h


def draft_scale(box_width: float, box_height: float, size: int) -> int:
    """The JPEG DCT scale 1/k to decode at: the largest k of 8, 4, 2 for which the box still
    has at least `size` pixels on each side at 1/k, so the resize after it only shrinks; 1
    (a full decode) when the box is less than twice the output."""
    for k in (8, 4, 2):
        if min(box_width, box_height) >= k * size:
            return k
    return 1


# What draft decoding changes in pixels. libjpeg's scaled IDCT averages each k x k block in
# the frequency domain instead of decoding every pixel and letting the antialiased bilinear
# resize average them, so the output is not bit-identical to a full decode. Measured
# (experiments.benchmark.draft_difference, 2026-12-02) on 128 re-encoded crops of
# scikit-learn's two sample photographs (300-500 px, JPEG quality 75-95), PSNR of the drafted
# crops against the full decode + resize of the same boxes, output px (eval_resize):
#   64 (73): train 40.3 dB (92 % of crops drafted), eval 38.4 dB (all)
#   112 (128): train 39.5 dB (57 %), eval 40.1 dB (all);  128 (146): 38.4 dB (41 %), 37.7 dB
#   160 (183): train 37.0 dB (11 %), eval 36.2 dB (34 %)
#   224 (256): no crop of a 300-500 px photo is 448 px on both sides: identical pixels.
# 36-42 dB is 2-4 levels of 255 RMS, about the JPEG's own coding error at quality 75-95.
def decode(raw: bytes, box_of, size: int, draft: bool = True):
    """Encoded image -> (RGB pixels uint8 [H, W, 3], box (left, top, right, bottom) in them).

    `box_of(width, height)` gives the crop (left, top, w, h) in the original's pixels; only
    the header is read before it is called. With `draft`, a JPEG whose box is k = 2, 4 or 8
    times the output on each side is decoded at 1/k by libjpeg's DCT scaling, and the box is
    scaled by 1/k: the same region of the photo, fewer pixels decoded and resized.

    JPEGs are decoded by simplejpeg (libjpeg-turbo 3, read from memory into a numpy array):
    the same pixels as Pillow's decoder, full or at 1/k (tests/test_stream.py), in ~0.75 of
    its time. CMYK JPEGs, other formats, and JPEGs libjpeg-turbo warns about go through
    Pillow, which decodes (or rejects) them as before.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError:  # not a JPEG (ImageNet has a PNG or two named .JPEG)
        return _decode_pil(raw, box_of, size, draft)
    if colorspace in ("CMYK", "YCCK"):  # simplejpeg converts these itself, a level off Pillow
        return _decode_pil(raw, box_of, size, draft)
    left, top, w, h = box_of(width, height)
    k = draft_scale(w, h, size) if draft else 1
    try:
        # 1/k is the smallest of libjpeg-turbo's m/8 scalings with at least ceil(side / k)
        # pixels a side: exactly what Pillow's draft decodes.
        pixels = simplejpeg.decode_jpeg(raw, colorspace="RGB", min_width=-(-width // k),
                                        min_height=-(-height // k), strict=True)
    except ValueError:  # a warning (corrupt data, truncated): Pillow's tolerance decides
        return _decode_pil(raw, box_of, size, draft)
    return pixels, (left / k, top / k, (left + w) / k, (top + h) / k)


def _decode_pil(raw: bytes, box_of, size: int, draft: bool):
    """`decode` through Pillow (draft = `Image.draft`), for what simplejpeg does not decode."""
    image = Image.open(io.BytesIO(raw))
    width, height = image.size  # from the header: nothing is decoded yet
    left, top, w, h = box_of(width, height)
    scale = 1
    if draft and (k := draft_scale(w, h, size)) > 1:
        # Pillow takes the largest k with size // requested >= k: (W // k, H // k) asks for k.
        drafted = image.draft("RGB", (width // k, height // k))  # None: not a JPEG, full decode
        if drafted is not None:
            scale = width / drafted[1][2]  # drafted box is (0, 0, width / k, height / k)
    if image.mode != "RGB":  # grayscale and CMYK JPEGs exist in ImageNet
        image = image.convert("RGB")
    return np.asarray(image), (left / scale, top / scale, (left + w) / scale, (top + h) / scale)


def crop_resize(pixels: np.ndarray, box: tuple[float, float, float, float], size: int,
                antialias: bool = True) -> np.ndarray:
    """The box of uint8 [H, W, 3] pixels, resized to uint8 [size, size, 3].

    antialias: bilinear with the filter widened by the shrink factor, as torchvision's
    RandomResizedCrop on PIL images (Pillow's resize, taps reaching past the box into the
    image). False: tf.data's resize (flax's imagenet example: `tf.image.resize` bilinear,
    half-pixel centres, no antialiasing): OpenCV's INTER_LINEAR on the box with its edges
    rounded to whole pixels (as tf.data's integer crop window), ~5x cheaper than Pillow's
    (0.2 against 1.0-1.4 ms at 224 px) and a different image when shrinking: PSNR ~37 dB against the antialiased one at 224 px,
    ~30 dB at 128 px (docs/stream_input.md).
    """
    if antialias:
        return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=box))
    left, top, right, bottom = (round(v) for v in box)
    crop = pixels[top:max(bottom, top + 1), left:max(right, left + 1)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)


def host_normalize(pixels: np.ndarray, mask: np.ndarray, normalization_name: str) -> np.ndarray:
    """uint8 [B, S, S, 3] -> float32 (x - mean) / std on the host, padding rows (mask 0)
    zero: what the workers shipped before normalisation moved to the device; still what
    reports that want host arrays use (pipeline.eval_batches)."""
    mean, std = normalization(normalization_name)
    images = pixels.astype(np.float32)
    images -= mean
    images /= std
    images[np.asarray(mask) == 0] = 0.0
    return images


class _LoadBatch:
    """Batch index -> one host batch of uint8 images: reads, decodes, crops (in a grain worker)."""

    def __init__(self, source, *, train: bool, num_examples: int, global_batch: int,
                 local_batch: int, process_index: int, seed: int, image_size: int,
                 eval_resize: int, flip: bool, draft: bool = True, antialias: bool = True,
                 extra_keys=()):
        self.source, self.train, self.n = source, train, num_examples
        self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index
        self.seed, self.size, self.eval_resize, self.flip = seed, image_size, eval_resize, flip
        self.draft, self.antialias, self.extra_keys = draft, antialias, tuple(extra_keys)
        self.steps_per_epoch = num_examples // global_batch
        self._perm_epoch, self._perm = -1, None  # the current epoch's order, cached per worker

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # once per epoch per worker (~20 ms for ImageNet)
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.n)
        return self._perm

    def _rows(self, index: int) -> tuple[int, np.ndarray]:
        """(epoch, record indices of this host's rows; -1 = padding) for batch `index`."""
        first = self.process_index * self.local_batch
        if self.train:
            epoch, step = divmod(index, self.steps_per_epoch)
            start = step * self.global_batch + first
            return epoch, self._epoch_order(epoch)[start:start + self.local_batch]
        rows = index * self.global_batch + first + np.arange(self.local_batch)
        return 0, np.where(rows < self.n, rows, -1)

    def box_of(self, rng: np.random.Generator | None):
        """(width, height) -> crop box: random resized crop if rng, else the eval center box."""
        if rng is not None:
            return lambda width, height: _random_resized_crop(width, height, rng)
        return lambda width, height: eval_box(width, height, self.size, self.eval_resize)

    def transform(self, raw: bytes, rng: np.random.Generator | None) -> np.ndarray:
        """Encoded image -> uint8 [S, S, 3]; random crop + flip if rng, else center crop.
        The crop box is drawn first and the flip second, from the same rng as always."""
        pixels, box = decode(raw, self.box_of(rng), self.size, self.draft)
        image = crop_resize(pixels, box, self.size, self.antialias)
        if rng is not None and self.flip and rng.random() < 0.5:
            image = cv2.flip(image, 1)  # 0.03 ms; copying numpy's reversed view costs 0.5
        return image

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        epoch, records = self._rows(index)
        real = records >= 0
        raw = self.source.__getitems__([int(r) for r in records[real]])  # one batched read
        pixels = np.zeros((self.local_batch, self.size, self.size, 3), np.uint8)
        labels = np.zeros(self.local_batch, np.int32)
        extras = {key: np.full(self.local_batch, -1, np.int64) for key in self.extra_keys}
        for row, record, example in zip(np.flatnonzero(real), records[real], raw):
            rng = np.random.default_rng([self.seed, 1, epoch, int(record)]) if self.train else None
            pixels[row] = self.transform(example["image"], rng)
            labels[row] = example["label"]
            for key in self.extra_keys:
                extras[key][row] = example[key]
        # uint8 to the device (a quarter of float32's bytes through shared memory and the
        # host-to-device copy); the pipeline normalises there (pipeline.normalize_on_device).
        return {"image": pixels, "label": labels, "mask": real.astype(np.float32), **extras}


def _quiet_resource_tracker() -> None:
    """Before Python 3.13, attaching to a worker's shared memory registers it with the
    resource tracker as if this process had made it, so at exit the tracker reports "There
    appear to be N leaked shared_memory objects" for blocks grain has already unlinked
    (/dev/shm is empty after a run: checked). The tracker process takes its warning filters
    from this process's -W options when it starts, so ignore that one message there."""
    if sys.version_info < (3, 13):
        option = "ignore:resource_tracker:UserWarning"
        if option not in sys.warnoptions:
            sys.warnoptions.append(option)


class StreamIterator:
    """Iterator of host batches {"image", "label", "mask"} with a JSON-serialisable state.

    Attributes:
      num_batches: batches in one pass (eval), None for the endless train stream.
      steps_per_epoch: global batches per epoch (train: n // G; eval: num_batches).
      num_examples: examples in the split.
    """

    def __init__(self, load_batch: _LoadBatch, *, num_batches: int | None, workers: int,
                 identity: dict[str, Any]):
        self._load, self._workers, self._identity = load_batch, workers, identity
        self.num_batches, self.num_examples = num_batches, load_batch.n
        self.steps_per_epoch = load_batch.steps_per_epoch if num_batches is None else num_batches
        self._next, self._iterator = 0, None

    def _start(self):
        stop = _INFINITE if self.num_batches is None else self.num_batches
        dataset = grain.MapDataset.range(self._next, stop).map(self._load)
        if self._workers > 0:
            # grain reads absl flags when it starts workers; outside an absl app (pytest, a
            # notebook) they are unparsed and it raises, so take the defaults then.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            _quiet_resource_tracker()
            # Workers take every workers-th batch; grain returns them in order, moving the
            # arrays through shared memory. One batch buffered per worker is prefetch enough.
            dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=1))
        else:
            # In this process; one thread prepares the next two batches while the step runs.
            dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        self._iterator = iter(dataset)

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._next >= self.num_batches:
            self.close()  # the pass is over: let the workers go now, not at garbage collection
            raise StopIteration
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position (next batch index) and what it is a position in; plain JSON."""
        return {"next_batch": self._next, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()`; refuses a state saved for a different stream."""
        changed = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if changed:
            raise UserError(f"the saved input-pipeline state belongs to a different stream "
                            f"(saved, now): {changed}")
        self.close()
        self._next = int(state["next_batch"])

    def measure_rate(self, max_images: int = 64) -> float:
        """Images/s one worker delivers: reads and transforms up to `max_images` of the next
        batch in this process, as a worker would (the stream's position does not move)."""
        load = self._load
        epoch, records = load._rows(self._next)
        records = records[records >= 0][:max_images]
        start = time.perf_counter()
        for record, example in zip(records, load.source.__getitems__([int(r) for r in records])):
            rng = np.random.default_rng([load.seed, 1, epoch, int(record)]) if load.train else None
            load.transform(example["image"], rng)
        return len(records) / max(time.perf_counter() - start, 1e-9)

    def close(self) -> None:
        """Stops the worker processes (they also stop when the iterator is garbage collected)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def make_stream(config, split: str, *, train: bool, global_batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1,
                extra_keys: tuple[str, ...] = ()) -> StreamIterator:
    """This host's share of a TFDS split as an iterator of batches (see the module docstring).

    Args:
      config: the whole config; reads data.name, data_dir, image_size, eval_image_size, eval_resize, flip,
        jpeg_draft, resize_antialias, workers and normalization (checked here; applied by the
        pipeline on the device: "imagenet": ImageNet mean/std; "none": scale to [0, 1]).
      split: TFDS split, slicing allowed ("train[:10%]").
      train: True: endless, reshuffled every epoch, random crop + flip. False: one pass in
        order, shorter side to eval_resize, center crop (eval_image_size, or image_size), last
        batch padded (mask 0).
      global_batch_size: batch over all hosts; must divide by process_count.
      seed: data order and augmentation seed (non-negative).
      process_index: this host (jax.process_index()).
      process_count: number of hosts (jax.process_count()).
      extra_keys: integer features to carry through as int64 (padding -1), e.g. ("id",).

    Returns:
      A StreamIterator of {"image": uint8 [L, S, S, 3] (padding rows zero), "label": int32
      [L], "mask": float32 [L]} with L = global_batch_size // process_count.
    """
    data = config.data
    if data.normalization not in NORMALIZATIONS:
        raise UserError(f"data.pipeline=stream supports data.normalization "
                        f"{' or '.join(NORMALIZATIONS)}, not {data.normalization!r}")
    if global_batch_size % process_count:
        raise UserError(f"batch size {global_batch_size} does not divide over {process_count} hosts")
    if not 0 <= process_index < process_count or seed < 0:
        raise ValueError(f"bad process_index={process_index}/{process_count} or seed={seed}")
    eval_size = data.eval_image_size or data.image_size
    if data.eval_resize < eval_size:
        field = "data.eval_image_size" if data.eval_image_size else "data.image_size"
        raise UserError(f"data.eval_resize={data.eval_resize} is below {field}={eval_size}")
    size = data.image_size if train else eval_size
    source = _open(data.name, split, data.data_dir)
    n = len(source)
    if train and n < global_batch_size:
        raise UserError(f"split {split!r} has {n} examples, fewer than one batch of {global_batch_size}")
    load = _LoadBatch(source, train=train, num_examples=n, global_batch=global_batch_size,
                      local_batch=global_batch_size // process_count, process_index=process_index,
                      seed=seed, image_size=size, eval_resize=data.eval_resize,
                      flip=data.flip, draft=data.jpeg_draft, antialias=data.resize_antialias,
                      extra_keys=extra_keys)
    identity = {"dataset": data.name, "split": split, "train": train, "num_examples": n,
                "global_batch_size": global_batch_size, "seed": seed}
    return StreamIterator(load, num_batches=None if train else -(-n // global_batch_size),
                          workers=data.workers, identity=identity)


def measure_throughput(config, split: str, batch_size: int, num_batches: int) -> dict[str, float]:
    """Images/s of the train pipeline (read + decode + crop + flip, uint8 out), one host.

    Times `num_batches` batches after one warm-up batch per worker (which pays for starting
    them). "images_per_s_per_worker" divides by the worker count (1 when workers = 0).
    """
    stream = make_stream(config, split, train=True, global_batch_size=batch_size, seed=0)
    try:
        for _ in range(max(config.data.workers, 1)):
            next(stream)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(stream)
        seconds = time.perf_counter() - start
    finally:
        stream.close()
    images_per_s = batch_size * num_batches / seconds
    workers = max(config.data.workers, 1)
    return {"images_per_s": images_per_s, "images_per_s_per_worker": images_per_s / workers,
            "workers": config.data.workers, "batch_size": batch_size,
            "num_batches": num_batches, "seconds": seconds}
