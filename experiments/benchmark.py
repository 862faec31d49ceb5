"""Training-step throughput and MFU, and the end-to-end rate with the real input pipeline.

    python -m experiments.benchmark --model=resnet50 --batch=256 --dtype=bfloat16 [--steps=50]
        [--data=synthetic|device|stream] [--json=FILE]

- synthetic: the mapped train step on one fixed batch already on the device (what
  experiments/reference.py measures); ms/step (median of three rounds of --steps/3
  back-to-back steps), img/s, compile time (lowering + XLA compilation), model FLOP/s
  (from XLA's cost analysis of the step as lowered) and MFU against the card's peak.
- device: `train_and_evaluate` end to end on device-resident data (gather, augmentation,
  per-epoch evaluation and checkpoints included), from its logged images/s.
- stream: the grain pipeline's rate in images/s per worker (one core) and for --workers
  processes, before (full JPEG decode, float32 out) and now (draft decode, uint8 out; with
  and without the antialiased resize), beside tf.data's decode_and_crop_jpeg + resize + flip
  on the same JPEGs and cores, once per resize: flax's example's bicubic, and bilinear with
  and without antialiasing (each stream mode's like-for-like reference: the headline
  ratios); the per-stage split; the draft's PSNR against a full decode. JPEGs: crops of
  scikit-learn's sample photos (or --tfds_name's). --steps batches of --batch per round.
Prints one table row per configuration (and appends it to --json as a JSON line).
"""

import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

from resnet_jax import cli, models, train
from resnet_jax.errors import UserError
from resnet_jax.parallel import Parallel
from resnet_jax.reporting import read_metrics

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "resnet20", "Model name, e.g. resnet20, resnet56, resnet50.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 128, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Timed steps (synthetic) or training steps (device).", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.", flag_values=FLAGS)
flags.DEFINE_enum("data", "synthetic", ["synthetic", "device", "stream"], "What to measure.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 0, "0: 32 for CIFAR models, 224 for ImageNet models.", flag_values=FLAGS)
flags.DEFINE_integer("steps_per_dispatch", 1, "device: steps scanned per dispatch.", flag_values=FLAGS)
flags.DEFINE_string("npz", "", "device: train on this .npz (e.g. CIFAR-10) instead of synthetic images.",
                    flag_values=FLAGS)
flags.DEFINE_string("tfds_name", "", "stream: a prepared TFDS dataset to decode.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "stream: TFDS data_dir.", flag_values=FLAGS)
flags.DEFINE_integer("workers", 1, "stream: grain worker processes.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 3, "stream: interleaved rounds of before / now / now without antialiasing / "
                     "the three tf.data pipelines.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Append the result as one JSON line to this file.", flag_values=FLAGS)

# Dense bf16 / fp32 (TF32 off) peak FLOP/s of the cards we report on.
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
              "A100": {"bfloat16": 312e12, "float32": 19.5e12}}


def _config(model: str, batch: int, dtype: str, image_size: int):
    from resnet_jax.configs import cifar, imagenet

    if models.model_family(model) == "imagenet":
        config = imagenet.get_config(model)
        config.data.pipeline = "device"
    else:
        config = cifar.get_config(model)
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.data.source = "synthetic"
    config.data.image_size = image_size or config.data.image_size
    config.data.normalization = "none"
    config.data.synthetic_examples = 2 * batch
    config.train.eval_batch_size = batch
    config.data.eval_splits = "test=test"
    config.train.progress = False
    return config


def _peak(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for card, peaks in PEAK_FLOPS.items():
        if card in kind:
            return peaks[dtype]
    return None


def _flops(lowered, compiled) -> float:
    """The step's FLOPs from XLA's cost analysis of the program as written (before
    optimisation): XLA:GPU's compiled module runs convolutions as cuDNN calls, which its
    cost analysis does not count (an H100 run reported 6.5 MFLOP per resnet20 image instead
    of 226). The compiled module's count where the lowered one has none."""
    for stage in (lowered, compiled):
        try:
            cost = stage.cost_analysis() if stage is not None else None
        except Exception:  # not every backend or version offers it
            cost = None
        cost = cost[0] if isinstance(cost, list) else cost
        if cost and cost.get("flops"):
            return float(cost["flops"])
    return 0.0


def synthetic_step(config, steps: int, warmup: int) -> dict:
    """Median time of the mapped train step on a fixed on-device batch."""
    parallel = Parallel(config.parallel.backend)
    trainer = train.Trainer(config, parallel)
    state = trainer.init_state()
    acc = trainer.empty_accumulator()
    rng = np.random.default_rng(0)
    size, batch = config.data.image_size, config.train.batch_size
    host_batch = {"image": rng.standard_normal((batch, size, size, 3), np.float32),
                  "label": rng.integers(0, config.data.num_classes, batch).astype(np.int32),
                  "mask": np.ones(batch, np.float32)}
    device_batch = parallel.shard(host_batch)
    step = trainer.train_on_batch
    start = time.perf_counter()
    lowered = step.lower(state, device_batch, acc) if hasattr(step, "lower") else None
    compiled = lowered.compile() if lowered is not None else None
    if compiled is None:  # no AOT lowering: the first call compiles (and runs one step)
        state, acc = step(state, device_batch, acc)
        jax.block_until_ready(acc)
    compile_s = time.perf_counter() - start
    flops = _flops(lowered, compiled)
    step = compiled or step  # the executable just built: calling `step` would compile it again
    for _ in range(warmup):
        state, acc = step(state, device_batch, acc)
    jax.block_until_ready(acc)
    # Like experiments/reference.py: steps are dispatched back to back and waited for once, so host
    # synchronisation is not timed; the median over a few such rounds resists noise.
    times = []
    per_round = max(steps // 3, 1)
    for _ in range(max(steps // per_round, 1)):
        start = time.perf_counter()
        for _ in range(per_round):
            state, acc = step(state, device_batch, acc)
        jax.block_until_ready(acc)
        times.append((time.perf_counter() - start) / per_round)
    median = statistics.median(times)
    # cost_analysis counts one device's program under shard_map: scale by devices.
    total_flops = flops * parallel.num_devices
    peak = _peak(config.model.dtype)
    return {"ms_per_step": 1e3 * median, "images_per_sec": batch / median, "compile_s": compile_s,
            "tflops_per_sec": total_flops / median / 1e12 if flops else None,
            "mfu": total_flops / median / (peak * parallel.num_devices) if flops and peak else None}


def device_end_to_end(config, steps: int, steps_per_dispatch: int, npz: str) -> dict:
    """train_and_evaluate on device-resident data; the median logged rate after the first window."""
    if npz:
        config.data.source, config.data.path = "npz", npz
        config.data.normalization = "per_pixel_mean"
        config.train.eval_batch_size = 1000
    config.train.total_steps = steps
    config.train.log_every = max(steps // 10, 1)
    config.train.checkpoint_every = steps
    config.train.steps_per_dispatch = steps_per_dispatch
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        rates = [r["images_per_sec"] for r in read_metrics(workdir) if r["split"] == "train"][1:]
    rate = statistics.median(rates)
    return {"images_per_sec": rate, "ms_per_step": 1e3 * config.train.batch_size / rate}


# --- data=stream: the host input pipeline against its former self and tf.data -----------


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Real photographs at ImageNet-like sizes: random crops (sides 300-500 px; the photos are
    427 px high) of scikit-learn's two sample photos, re-encoded at JPEG quality 75-95.
    Photos, not noise: noise compresses and decodes unlike photographs."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos, rng, jpegs = load_sample_images().images, np.random.default_rng(seed), []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        w, h = int(rng.integers(300, min(width, 500) + 1)), int(rng.integers(300, min(height, 500) + 1))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        buffer = io.BytesIO()
        Image.fromarray(photo[y:y + h, x:x + w]).save(buffer, "JPEG", quality=int(rng.integers(75, 96)))
        jpegs.append(buffer.getvalue())
    return jpegs


class PhotoSource:
    """In-memory JPEGs with the random access of `tfds.data_source` (what `_LoadBatch` reads)."""

    def __init__(self, jpegs: list[bytes]):
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitems__(self, indices):
        return [{"image": self.jpegs[i], "label": i % 1000} for i in indices]


def _loaders(jpegs, size: int, batch: int):
    """{before, after, bilinear}: the stream's loader as it was (Pillow's full decode and
    resize, float32 normalised by the worker), as it is (simplejpeg with DCT scaling, Pillow's
    antialiased resize, uint8 out), and as it is with data.resize_antialias=False (OpenCV's
    bilinear resize, tf.data's)."""
    import io

    from PIL import Image

    from resnet_jax.data import stream

    class Before(stream._LoadBatch):
        """The worker as it was: Pillow decodes the whole JPEG and resizes the box (antialiased
        bilinear), flips, and the batch is normalised to float32 in the worker."""

        def steps(self):
            """(decode, crop+resize, flip), each as the worker did it."""
            def decode(raw, rng):
                image = Image.open(io.BytesIO(raw))
                left, top, w, h = self.box_of(rng)(*image.size)
                image.load()
                return image if image.mode == "RGB" else image.convert("RGB"), (left, top, left + w, top + h)

            return (decode, lambda image, box: image.resize((self.size, self.size), Image.BILINEAR, box=box),
                    lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))

        def transform(self, raw, rng):
            decode, resize, flip = self.steps()
            image = resize(*decode(raw, rng))
            return np.asarray(flip(image) if self.flip and rng.random() < 0.5 else image)

        def __call__(self, index):
            out = super().__call__(index)
            return {**out, "image": stream.host_normalize(out["image"], out["mask"], "imagenet")}

    kwargs = dict(train=True, num_examples=len(jpegs), global_batch=batch, local_batch=batch, process_index=0,
                  seed=0, image_size=size, eval_resize=round(size * 256 / 224), flip=True)
    return {"before": Before(PhotoSource(jpegs), draft=False, **kwargs),
            "after": stream._LoadBatch(PhotoSource(jpegs), draft=True, **kwargs),
            "bilinear": stream._LoadBatch(PhotoSource(jpegs), draft=True, antialias=False, **kwargs)}


def _stream_steps(load):
    """(decode, crop+resize, flip) of the stream's loader as it is, for the stage split."""
    import cv2

    from resnet_jax.data import stream

    return (lambda raw, rng: stream.decode(raw, load.box_of(rng), load.size, load.draft),
            lambda pixels, box: stream.crop_resize(pixels, box, load.size, load.antialias),
            lambda image: cv2.flip(image, 1))


def _in_process_rate(load, batches: int) -> tuple[float, float]:
    """(images per second, images per CPU second) of one worker: the loader called in this
    process, as a worker calls it. CPU seconds (this process's, all threads) are what a core
    delivers whatever else the machine runs; wall seconds also count the waits for a core."""
    load(0)  # warm (first-call costs: imports, allocations)
    start, cpu = time.perf_counter(), time.process_time()
    for index in range(1, batches + 1):
        load(index)
    images = batches * load.local_batch
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def _workers_rate(load, workers: int, batches: int) -> float:
    """Images/s of `workers` grain processes feeding this one (shared memory included)."""
    from resnet_jax.data import stream

    iterator = stream.StreamIterator(load, num_batches=None, workers=workers, identity={})
    try:
        for _ in range(2 * workers):  # starting the workers and filling their buffers
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * load.local_batch / (time.perf_counter() - start)
    finally:
        iterator.close()


def _stages(load, batches: int, normalise: bool) -> dict:
    """CPU ms per image of read, decode, crop+resize, flip, collate (the loader's steps, each
    timed by this process's CPU clock: one thread, so it is the work done, not the waits)."""
    from resnet_jax.data import stream

    decode, resize, flip = load.steps() if hasattr(load, "steps") else _stream_steps(load)
    clock, ms = time.process_time, dict.fromkeys(("read", "decode", "crop_resize", "flip", "collate"), 0.0)
    for index in range(batches):
        t0 = clock()
        epoch, records = load._rows(index)
        raw = load.source.__getitems__([int(r) for r in records])
        ms["read"] += clock() - t0
        pixels = np.zeros((load.local_batch, load.size, load.size, 3), np.uint8)
        for row, (record, example) in enumerate(zip(records, raw)):
            rng = np.random.default_rng([load.seed, 1, epoch, int(record)])
            t0 = clock()
            image, box = decode(example["image"], rng)
            t1 = clock()
            image = resize(image, box)
            t2 = clock()
            if rng.random() < 0.5:
                image = flip(image)
            t3 = clock()
            pixels[row] = np.asarray(image)
            ms["decode"], ms["crop_resize"], ms["flip"] = (ms["decode"] + t1 - t0, ms["crop_resize"] + t2 - t1,
                                                           ms["flip"] + t3 - t2)
            ms["collate"] += clock() - t3
        t0 = clock()
        if normalise:
            stream.host_normalize(pixels, np.ones(load.local_batch), "imagenet")
        ms["collate"] += clock() - t0
    return {k: 1e3 * v / (batches * load.local_batch) for k, v in ms.items()}


# tf.data's preprocessing as three references, one per resize: flax's imagenet example as
# written (bicubic, no antialiasing), and the two like-for-like ones for the stream's two
# resizes (bilinear without antialiasing: data.resize_antialias=False; bilinear with it: the
# default, the same triangle filter widened by the shrink factor as Pillow's).
TF_RESIZES = {"tf_flax": ("bicubic", False), "tf_bilinear": ("bilinear", False), "tf_antialias": ("bilinear", True)}


def _tf_rate(jpegs, size: int, threads: int, batch: int, batches: int, resize: str = "tf_flax") -> tuple[float, float]:
    """(images/s, images per CPU second) of flax's imagenet example's train preprocessing in
    tf.data on `threads` threads: sample_distorted_bounding_box + decode_and_crop_jpeg + resize
    (`TF_RESIZES[resize]`) + flip, cast to uint8 (the same output as the stream's workers)."""
    # TensorFlow here only, for the comparison: training never imports it (DESIGN.md).
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    method, antialias = TF_RESIZES[resize]

    def preprocess(jpeg):
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(jpeg), tf.zeros([0, 0, 4]), min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
        image = tf.image.resize(image, [size, size], method=method, antialias=antialias)
        image = tf.image.random_flip_left_right(image)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    options = tf.data.Options()
    options.threading.private_threadpool_size, options.threading.max_intra_op_parallelism = threads, 1
    dataset = (tf.data.Dataset.from_tensor_slices(jpegs).repeat().map(preprocess, num_parallel_calls=threads)
               .batch(batch).with_options(options))
    iterator = iter(dataset)
    next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    # tf.data prefetches: stop its threads before reading the CPU clock, at the cost of
    # counting a batch or two more of its work against it (small against `batches`).
    del iterator
    return batches * batch / (time.perf_counter() - start), batches * batch / (time.process_time() - cpu)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def draft_difference(jpegs, size: int, eval_resize: int, draws: int = 4) -> dict:
    """PSNR of draft decoding against a full decode, on the same boxes: train crops (`draws`
    per JPEG) and eval center crops, over those the draft decodes at 1/2 or less; and the
    share of train crops it decodes so."""
    import io

    from PIL import Image

    from resnet_jax.data import stream

    out = {}
    for mode in ("train", "eval"):
        load = stream._LoadBatch(PhotoSource(jpegs), train=mode == "train", num_examples=len(jpegs), global_batch=1,
                                 local_batch=1, process_index=0, seed=0, image_size=size, eval_resize=eval_resize,
                                 flip=False)
        drafted, full, total = [], [], 0
        for index, jpeg in enumerate(jpegs):
            for draw in range(draws if mode == "train" else 1):
                rng = lambda: np.random.default_rng([7, index, draw]) if mode == "train" else None
                box = load.box_of(rng())
                width, height = Image.open(io.BytesIO(jpeg)).size  # the header only
                total += 1
                if stream.draft_scale(*box(width, height)[2:], size) == 1:
                    continue
                load.draft = True
                drafted.append(load.transform(jpeg, rng()))
                load.draft = False
                full.append(load.transform(jpeg, rng()))
        out[f"{mode}_drafted_share"] = len(drafted) / total
        out[f"{mode}_psnr_db"] = _psnr(np.stack(drafted), np.stack(full)) if drafted else None
    return out


def resize_difference(jpegs, size: int, draws: int = 4) -> float:
    """PSNR of the resize without antialiasing (data.resize_antialias=False) against the
    antialiased one, on the same train crops (`draws` per JPEG)."""
    loaders = _loaders(jpegs, size, 1)
    out = {}
    for name in ("after", "bilinear"):
        load = loaders[name]
        load.flip = False
        out[name] = np.stack([load.transform(jpeg, np.random.default_rng([7, index, draw]))
                              for index, jpeg in enumerate(jpegs) for draw in range(draws)])
    return _psnr(out["bilinear"], out["after"])


def tf_antialias_difference(jpegs, size: int, draws: int = 2) -> int:
    """Largest difference, in levels, between the stream's default resize (Pillow's
    antialiased bilinear) and tf.data's bilinear with antialias=True on the same crop windows
    (train boxes rounded to pixels, each resized whole): the like-for-like reference does the
    same work. Pillow rounds to 8 bits between its two passes (at most half a level), so the
    two may differ by one level, never more."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from resnet_jax.data import stream

    load, (method, antialias) = _loaders(jpegs, size, 1)["after"], TF_RESIZES["tf_antialias"]
    worst = 0
    for index, jpeg in enumerate(jpegs):
        for draw in range(draws):
            pixels, (left, top, right, bottom) = stream.decode(
                jpeg, load.box_of(np.random.default_rng([7, index, draw])), size, draft=False)
            crop = np.ascontiguousarray(pixels[round(top):round(bottom), round(left):round(right)])
            ours = stream.crop_resize(crop, (0, 0, crop.shape[1], crop.shape[0]), size, antialias=True)
            theirs = tf.image.resize(crop, [size, size], method=method, antialias=antialias)
            theirs = tf.cast(tf.clip_by_value(tf.round(theirs), 0, 255), tf.uint8).numpy()
            worst = max(worst, int(np.abs(ours.astype(int) - theirs).max()))
    return worst


def stream_rate(config, tfds_name: str, data_dir: str, workers: int, batches: int, rounds: int) -> dict:
    """Per-worker images/s before (Pillow, float32 out), after (simplejpeg + draft, Pillow's
    antialiased resize, uint8 out), after without antialiasing, and tf.data on one thread with
    each of `TF_RESIZES`, interleaved `rounds` times on the same JPEGs; then `workers`
    processes (threads for tf.data); the stage split; the draft's and the plain resize's pixel
    differences; how far tf.data's antialiased resize is from the stream's."""
    size, batch = config.data.image_size, config.train.batch_size
    if tfds_name:  # a prepared dataset's own JPEGs instead of the photos
        from resnet_jax.data import stream

        source = stream._open(tfds_name, config.data.train_split, data_dir)
        jpegs = [r["image"] for r in source.__getitems__(list(range(min(len(source), 512))))]
    else:
        jpegs = photo_jpegs(512)
    loaders = _loaders(jpegs, size, batch)
    rates = {name: [] for name in (*loaders, *TF_RESIZES)}  # (wall, cpu) images/s per round
    for _ in range(rounds):  # interleaved, so load from other processes hits all alike
        for name, load in loaders.items():
            rates[name].append(_in_process_rate(load, batches))
        for name in TF_RESIZES:
            rates[name].append(_tf_rate(jpegs, size, 1, batch, batches, name))
    result = {"jpegs": len(jpegs), "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1e3, "rounds": rounds}
    for clock, name in ((1, "cpu"), (0, "wall")):
        series = {k: [r[clock] for r in v] for k, v in rates.items()}
        suffix = "" if name == "cpu" else "_wall"
        ratios = lambda key, to: [a / b for a, b in zip(series[key], series[to])]  # per round
        # ratio_vs_tf: against tf.data doing the same resize; ratio_vs_tf_flax: against flax's.
        for prefix, key, like in (("", "after", "tf_antialias"), ("bilinear_", "bilinear", "tf_bilinear")):
            result.update({
                f"{prefix or 'images_per_sec_'}per_worker{suffix}": statistics.median(series[key]),
                f"{prefix}ratio_vs_tf{suffix}": statistics.median(ratios(key, like)),
                f"{prefix}ratio_vs_tf_flax{suffix}": statistics.median(ratios(key, "tf_flax")),
                f"{prefix}ratio_vs_before{suffix}": statistics.median(ratios(key, "before")),
                f"spread_{prefix}per_worker{suffix}": [min(series[key]), max(series[key])],
                f"spread_{prefix}ratio_vs_tf{suffix}": [min(ratios(key, like)), max(ratios(key, like))]})
        for key in ("before", *TF_RESIZES):
            result.update({f"{key}_per_{'worker' if key == 'before' else 'thread'}{suffix}": statistics.median(series[key]),
                           f"spread_{key}{suffix}": [min(series[key]), max(series[key])]})
    result["images_per_sec"] = result["images_per_sec_per_worker_wall"]  # what --workers deliver (wall)
    if workers > 0:
        result[f"images_per_sec_{workers}_workers"] = result["images_per_sec"] = _workers_rate(
            loaders["after"], workers, batches)
        result[f"bilinear_{workers}_workers"] = _workers_rate(loaders["bilinear"], workers, batches)
        result[f"before_{workers}_workers"] = _workers_rate(loaders["before"], workers, batches)
        for name in ("tf_antialias", "tf_bilinear"):
            result[f"{name}_{workers}_threads"] = _tf_rate(jpegs, size, workers, batch, batches, name)[0]
    for name in ("before", "after", "bilinear"):
        result[f"stages_ms_{name}"] = _stages(loaders[name], batches, normalise=name == "before")
    result.update(draft_difference(jpegs[:128], size, loaders["before"].eval_resize))
    result["bilinear_psnr_db"] = resize_difference(jpegs[:128], size)
    result["tf_antialias_max_diff"] = tf_antialias_difference(jpegs[:64], size)
    _print_stream_table(result, workers)
    return result


def _print_stream_table(result: dict, workers: int) -> None:
    spread = lambda key: f"{result[key][0]:,.0f}-{result[key][1]:,.0f}"
    for suffix, what in (("", "images per CPU second (one core's rate)"), ("_wall", "images per wall second")):
        print(f"{what}, median of {result['rounds']} interleaved rounds (min-max):")
        print(f"  stream before (Pillow, float32):             {result['before_per_worker' + suffix]:8,.0f}  "
              f"({spread('spread_before' + suffix)})")
        for key, what_tf in (("tf_flax", "flax's example (bicubic)   "), ("tf_bilinear", "bilinear                   "),
                             ("tf_antialias", "bilinear, antialias=True   ")):
            print(f"  tf.data, {what_tf}:       {result[f'{key}_per_thread{suffix}']:8,.0f}  "
                  f"({spread(f'spread_{key}{suffix}')})")
        for prefix, what_now, like in (("", "now (antialiased resize)   ", "bilinear, antialias=True"),
                                       ("bilinear_", "now, resize_antialias=False", "bilinear")):
            low, high = result[f"spread_{prefix}ratio_vs_tf{suffix}"]
            print(f"  stream {what_now}:        {result[(prefix or 'images_per_sec_') + 'per_worker' + suffix]:8,.0f}  "
                  f"({spread(f'spread_{prefix}per_worker{suffix}')})  x{result[f'{prefix}ratio_vs_before{suffix}']:.2f} "
                  f"of before, x{result[f'{prefix}ratio_vs_tf{suffix}']:.2f} of tf.data {like} ({low:.2f}-{high:.2f}), "
                  f"x{result[f'{prefix}ratio_vs_tf_flax{suffix}']:.2f} of flax's")
    if workers > 0:
        print(f"{workers} workers: stream {result[f'images_per_sec_{workers}_workers']:,.0f}, without antialiasing "
              f"{result[f'bilinear_{workers}_workers']:,.0f}, before {result[f'before_{workers}_workers']:,.0f}; "
              f"tf.data ({workers} threads) antialiased {result[f'tf_antialias_{workers}_threads']:,.0f}, "
              f"bilinear {result[f'tf_bilinear_{workers}_threads']:,.0f} images/s")
    for key in ("stages_ms_before", "stages_ms_after", "stages_ms_bilinear"):
        print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[key].items())
              + f" (total {sum(result[key].values()):.3f} ms/image)")
    for mode in ("train", "eval"):
        psnr = result[f"{mode}_psnr_db"]
        print(f"draft vs full decode, {mode}: {100 * result[f'{mode}_drafted_share']:.0f}% of crops drafted, "
              + (f"PSNR {psnr:.1f} dB" if psnr is not None else "no crop drafted: identical pixels"))
    print(f"resize without vs with antialiasing, train crops: PSNR {result['bilinear_psnr_db']:.1f} dB")
    print(f"antialiased resize vs tf.data's bilinear with antialias=True, same crop windows: at most "
          f"{result['tf_antialias_max_diff']} level apart")


def run(argv) -> dict:
    try:
        family = models.model_family(FLAGS.model)
    except ValueError as error:
        raise UserError(str(error)) from None
    image_size = FLAGS.image_size or (224 if family == "imagenet" else 32)
    config = _config(FLAGS.model, FLAGS.batch, FLAGS.dtype, image_size)
    if FLAGS.batch % jax.device_count():
        raise UserError(f"--batch={FLAGS.batch} does not divide over {jax.device_count()} devices")
    if FLAGS.data == "synthetic":
        result = synthetic_step(config, FLAGS.steps, FLAGS.warmup)
    elif FLAGS.data == "device":
        result = device_end_to_end(config, FLAGS.steps, FLAGS.steps_per_dispatch, FLAGS.npz)
    else:
        result = stream_rate(config, FLAGS.tfds_name, FLAGS.data_dir, FLAGS.workers, FLAGS.steps, FLAGS.rounds)
    row = {"model": FLAGS.model, "batch": FLAGS.batch, "dtype": FLAGS.dtype, "image_size": image_size,
           "data": FLAGS.data, "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
           "jax": jax.__version__, **result}
    cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
             if v is not None and not isinstance(v, (dict, list))]  # the stream's splits: in the table and --json
    print("RESULT " + " ".join(cells), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        run(cli.parse_flags(FLAGS, argv, __doc__))


if __name__ == "__main__":
    main()
