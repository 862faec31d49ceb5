"""The streamed input pipeline (grain over TFDS ArrayRecord) on a tiny ImageNet-like dataset."""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from resnet_jax.config import default_config
from resnet_jax.data import sources, stream
from resnet_jax.errors import UserError

# The smallest and largest ImageNet-normalised values: (0 - mean) / std and (255 - mean) / std.
LOW = float(np.min(-stream.IMAGENET_MEAN / stream.IMAGENET_STD))
HIGH = float(np.max((255 - stream.IMAGENET_MEAN) / stream.IMAGENET_STD))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny dataset, prepared once as ArrayRecord (preparing imports TensorFlow; fine here)."""
    try:  # tests/ on sys.path (pytest's default "prepend" import mode, no tests/__init__.py)
        import tiny_imagenet_builder
    except ImportError:  # tests/ is a package
        from tests import tiny_imagenet_builder

    path = str(tmp_path_factory.mktemp("tfds"))
    tiny_imagenet_builder.prepare_tiny(path)
    return path


@pytest.fixture
def make(data_dir):
    """make(split, train=..., batch=..., seed=..., **data overrides) -> StreamIterator."""
    iterators = []

    def _make(split="train", *, train=True, batch=8, seed=0, process_index=0, process_count=1,
              **data):
        config = default_config()
        config.data.update(dict(name="tiny_imagenet_like", data_dir=data_dir, image_size=32,
                                eval_resize=36, normalization="imagenet", workers=0))
        config.data.update(data)
        iterator = stream.make_stream(config, split, train=train, global_batch_size=batch,
                                      seed=seed, process_index=process_index,
                                      process_count=process_count, extra_keys=("id",))
        iterators.append(iterator)
        return iterator

    yield _make
    for iterator in iterators:
        iterator.close()


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shapes_dtypes_and_value_ranges(make):
    for train in (True, False):
        batch = next(make("train" if train else "validation", train=train, image_size=224,
                          eval_resize=256))
        assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1)
        assert batch["image"].min() < 10 and batch["image"].max() > 245  # full-range photos
        assert set(batch["label"]) <= set(range(5))
        normalised = stream.host_normalize(batch["image"], batch["mask"], "imagenet")
        assert LOW - 1e-4 <= normalised.min() < -1 and 2 < normalised.max() <= HIGH + 1e-4
    unit = stream.host_normalize(next(make())["image"], np.ones(8), "none")
    assert 0 <= unit.min() and unit.max() <= 1 and unit.max() > 0.9


def test_eval_transform_is_resize_then_center_crop(make, data_dir):
    """Row i of the eval stream is record i: shorter side to 36, center 32x32, as torchvision."""
    import tensorflow_datasets as tfds

    raw = tfds.data_source("tiny_imagenet_like", split="validation", data_dir=data_dir,
                           decoders={"image": tfds.decode.SkipDecoding()})
    batch = next(make("validation", train=False, jpeg_draft=False))
    for row in range(8):
        image = Image.open(io.BytesIO(raw[row]["image"])).convert("RGB")
        scale = 36 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BILINEAR)
        left, top = round((image.width - 32) / 2), round((image.height - 32) / 2)
        expected = np.asarray(image.crop((left, top, left + 32, top + 32)), np.float32) / 255
        assert np.abs(batch["image"][row] / 255 - expected).mean() < 0.03
        assert batch["id"][row] == raw[row]["id"] and batch["label"][row] == raw[row]["label"]


def test_same_seed_same_batches_other_seed_other_batches(make):
    first = take(make(seed=3), 5)
    assert_same(first, take(make(seed=3), 5))
    other = take(make(seed=4), 5)
    assert not np.array_equal(first[0]["id"], other[0]["id"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_worker_processes_give_the_same_batches(make):
    assert_same(take(make(), 6), take(make(workers=2), 6))


def test_epochs_are_permutations_reshuffled_each_epoch(make):
    iterator = make()  # 37 examples, batch 8: 4 batches an epoch, 5 examples dropped
    assert iterator.steps_per_epoch == 4 and iterator.num_batches is None
    epochs = [np.concatenate([b["id"] for b in take(iterator, 4)]) for _ in range(3)]
    for ids in epochs:
        assert len(set(ids)) == 32 and set(ids) <= set(range(37))
    assert not np.array_equal(epochs[0], epochs[1])
    # The same record is cropped afresh each epoch (batch 37 = one whole epoch a batch).
    crops = [b["image"][b["id"] == 0][0] for b in take(make(batch=37), 2)]
    assert not np.array_equal(*crops)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(make, workers):
    """Stop after 3 batches, restore in a new iterator; the epoch boundary (4) is crossed."""
    uninterrupted = take(make(), 9)
    interrupted = make(workers=workers)
    take(interrupted, 3)
    state = json.loads(json.dumps(interrupted.get_state()))  # what ocp.args.JsonSave stores
    interrupted.close()
    resumed = make(workers=workers)
    resumed.set_state(state)
    assert_same(uninterrupted[3:], take(resumed, 6))


def test_state_of_another_stream_is_refused(make):
    state = make(seed=1).get_state()
    with pytest.raises(UserError, match="different stream"):
        make(seed=2).set_state(state)


def test_eval_covers_every_example_once_in_order(make, data_dir):
    iterator = make("validation", train=False, batch=10)
    batches = list(iterator)
    assert len(batches) == iterator.num_batches == 3  # 23 examples: 10 + 10 + 3 and 7 padding
    ids = np.concatenate([b["id"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == 23 == stream.num_examples("tiny_imagenet_like", "validation", data_dir)
    assert np.all(mask[:23] == 1) and np.all(mask[23:] == 0)
    assert sorted(ids[:23]) == list(range(1000, 1023))
    np.testing.assert_array_equal(labels[:23], (ids[:23] - 1000) % 5)  # the builder's labels
    assert np.all(batches[-1]["image"][3:] == 0) and all(b["image"].shape[0] == 10 for b in batches)
    assert batches[-1]["image"].dtype == np.uint8
    with pytest.raises(StopIteration):
        next(iterator)


def test_two_hosts_eval_shards_are_disjoint_and_cover_the_split(make):
    hosts = [list(make("validation", train=False, batch=10, process_index=p, process_count=2))
             for p in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == 3  # equal batch counts: no host waits on another
    ids = [np.concatenate([b["id"][b["mask"] == 1] for b in host]) for host in hosts]
    assert all(b["image"].shape[0] == 5 for host in hosts for b in host)
    assert not set(ids[0]) & set(ids[1])
    assert sorted(np.concatenate(ids)) == list(range(1000, 1023))


def test_two_hosts_train_split_each_global_batch(make):
    """Host p gets rows [p*L, (p+1)*L) of the one-host global batch, crops included."""
    single = take(make(batch=8), 5)
    halves = [take(make(batch=8, process_index=p, process_count=2), 5) for p in (0, 1)]
    for step, whole in enumerate(single):
        for key in whole:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key])


def test_random_resized_crop_boxes():
    rng = np.random.default_rng(0)
    for width, height in [(400, 350), (40, 60), (32, 32)]:
        for _ in range(200):
            left, top, w, h = stream._random_resized_crop(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            assert w * h >= 0.08 * width * height * 0.9
    # Too elongated for any 3/4..4/3 crop of 8 %+ area: the fallback center crop.
    assert stream._random_resized_crop(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)


def test_bad_input_is_a_user_error(make, data_dir):
    with pytest.raises(UserError, match="normalization"):
        make(normalization="per_pixel_mean")
    with pytest.raises(UserError, match="cannot read TFDS"):
        make(name="not_prepared_here")
    with pytest.raises(UserError, match="fewer than one batch"):
        make(batch=64)


def test_measure_throughput(data_dir):
    config = default_config()
    config.data.update(dict(name="tiny_imagenet_like", data_dir=data_dir, image_size=64,
                            normalization="imagenet", workers=0))
    result = stream.measure_throughput(config, "train", batch_size=8, num_batches=3)
    assert result["images_per_s"] > 0 and result["images_per_s_per_worker"] == result["images_per_s"]


def test_reading_never_imports_tensorflow(data_dir):
    """A fresh process that only reads a prepared dataset must not load TensorFlow."""
    script = textwrap.dedent(f"""
        import sys
        from resnet_jax.config import default_config
        from resnet_jax.data import sources, stream

        config = default_config()
        config.data.update(dict(name="tiny_imagenet_like", data_dir={data_dir!r},
                                image_size=32, eval_resize=36, normalization="imagenet"))
        assert stream.num_examples("tiny_imagenet_like", "train", {data_dir!r}) == 37
        train = stream.make_stream(config, "train", train=True, global_batch_size=8, seed=0)
        for _ in range(6):
            next(train)
        assert sum(b["mask"].sum() for b in stream.make_stream(
            config, "validation", train=False, global_batch_size=8, seed=0)) == 23
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras"))
        assert not loaded, loaded
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_prepare_is_a_no_op_when_prepared(data_dir):
    sources.prepare_tfds("tiny_imagenet_like", data_dir)  # the builder is registered by the fixture
    assert stream.num_examples("tiny_imagenet_like", "train[:10]", data_dir) == 10


# --- The crop distribution, draft decoding and normalising on the device -----------------


def _reference_box_histograms(width, height, area_edges, ratio_edges, grid=1000):
    """Bin probabilities of the box's area fraction and log aspect ratio under torchvision's
    RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3) log-uniform, 10 tries,
    then the center crop), by integrating one try over a fine grid of its two uniforms."""
    u = 0.08 + (1 - 0.08) * (np.arange(grid) + 0.5) / grid
    v = np.log(3 / 4) + (np.log(4 / 3) - np.log(3 / 4)) * (np.arange(grid) + 0.5) / grid
    area, ratio = np.meshgrid(u * width * height, np.exp(v), indexing="ij")
    w, h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))  # round half even, as Python
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    accept = ok.mean()
    fail = (1 - accept) ** 10
    fw, fh = width, height  # the fallback center crop
    if width / height < 3 / 4:
        fh = round(width / (3 / 4))
    elif width / height > 4 / 3:
        fw = round(height * (4 / 3))
    out = []
    for values, fallback, edges in ((w * h / (width * height), fw * fh / (width * height), area_edges),
                                    (np.log(w / h), np.log(fw / fh), ratio_edges)):
        tried = np.histogram(values[ok], edges)[0] / ok.sum()
        out.append((1 - fail) * tried + fail * np.histogram([fallback], edges)[0])
    return out


@pytest.mark.parametrize("width,height", [(500, 375), (640, 200)])
def test_crop_boxes_follow_torchvision_random_resized_crop(width, height):
    """Histograms of area fraction and log aspect ratio over many draws are within binomial
    bounds (4.5 sigma per bin) of torchvision's distribution; (640, 200) is elongated enough
    that the 10 tries often fail, so the fallback's mass is tested too."""
    draws = 20_000
    rng = np.random.default_rng(1)
    boxes = np.array([stream._random_resized_crop(width, height, rng) for _ in range(draws)])
    left, top, w, h = boxes.T
    assert np.all((left >= 0) & (left + w <= width) & (top >= 0) & (top + h <= height))
    area_edges = np.linspace(0, 1, 11)
    ratio_edges = np.linspace(np.log(3 / 4) - 0.02, np.log(4 / 3) + 0.02, 11)
    expected = _reference_box_histograms(width, height, area_edges, ratio_edges)
    for observed_values, edges, p in ((w * h / (width * height), area_edges, expected[0]),
                                      (np.log(w / h), ratio_edges, expected[1])):
        counts = np.histogram(observed_values, edges)[0]
        bound = 4.5 * np.sqrt(draws * p * (1 - p)) + 2  # + 2: the grid's integration error
        assert np.all(np.abs(counts - draws * p) <= bound), (counts, np.round(draws * p))
    # The offset is uniform over the positions that fit: its mean is the middle.
    slack = (width - w).astype(float)
    moved = slack > 0
    assert abs(np.mean(left[moved] / slack[moved]) - 0.5) < 4.5 * np.sqrt(1 / 12 / moved.sum())


def _photo_jpeg_pixels(width, height):
    """The top left width x height of one of scikit-learn's sample photographs (427 x 640)."""
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0][:height, :width]


def _photo_jpeg(width, height, quality=90, mode="RGB"):
    """A crop of one of scikit-learn's sample photographs (427 x 640), as a JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(_photo_jpeg_pixels(width, height)).convert(mode).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.parametrize("box_side,size,scale", [(100, 64, 1), (127, 64, 1), (128, 64, 2), (255, 64, 2),
                                                  (256, 64, 4), (400, 64, 4), (384, 48, 8), (400, 200, 2)])
def test_draft_decoding_is_used_exactly_when_the_box_allows(box_side, size, scale):
    """Decoded at 1/k exactly when the box is k times the output on both sides; the box is
    then the same region of the photo in the smaller image's pixels."""
    width, height = 600, 420
    raw = _photo_jpeg(width, height)
    box = (30, 10, box_side, box_side + 7)
    image, scaled = stream.decode(raw, lambda w, h: box, size, draft=True)
    assert image.shape == (-(-height // scale), -(-width // scale), 3) and image.dtype == np.uint8
    np.testing.assert_allclose(scaled, (30 / scale, 10 / scale, (30 + box_side) / scale,
                                        (10 + box_side + 7) / scale))
    full, _ = stream.decode(raw, lambda w, h: box, size, draft=False)
    assert full.shape == (height, width, 3)
    if scale > 1:  # a pixel short of k times on one side: the next smaller factor
        narrow, _ = stream.decode(raw, lambda w, h: (0, 0, box_side, size * scale - 1), size)
        assert narrow.shape == (-(-height // (scale // 2)), -(-width // (scale // 2)), 3)


def test_draft_decoding_keeps_the_crop_within_the_measured_psnr():
    """The drafted crop is the full decode's crop up to DCT scaling: PSNR at least 34 dB on a
    photo (measured 36-42 dB, see data/stream.py); a box off by a source pixel or more would
    not get near it. Grayscale JPEGs are drafted and converted too; PNGs never drafted."""
    raw = _photo_jpeg(600, 420)
    load = stream._LoadBatch(None, train=True, num_examples=1, global_batch=1, local_batch=1,
                             process_index=0, seed=0, image_size=64, eval_resize=73, flip=False)
    for seed in range(8):
        load.draft = True
        drafted = load.transform(raw, np.random.default_rng(seed)).astype(np.float64)
        load.draft = False
        full = load.transform(raw, np.random.default_rng(seed))
        assert 10 * np.log10(255 ** 2 / np.mean((drafted - full) ** 2)) > 34
    gray, _ = stream.decode(_photo_jpeg(600, 420, mode="L"), lambda w, h: (0, 0, 300, 300), 64)
    assert gray.shape == (105, 150, 3)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(raw)).save(buffer, "PNG")
    png, box = stream.decode(buffer.getvalue(), lambda w, h: (0, 0, 300, 300), 64)
    assert png.shape == (420, 600, 3) and box == (0, 0, 300, 300)


def _pillow_decode(raw, k=1):
    """Pillow's decode, at 1/k with `Image.draft`: what the stream's workers decoded before."""
    image = Image.open(io.BytesIO(raw))
    if k > 1:
        image.draft("RGB", (image.width // k, image.height // k))
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode,options", [("RGB", {}), ("L", {}), ("RGB", {"progressive": True}),
                                          ("RGB", {"subsampling": 0}), ("CMYK", {})])
def test_decoded_pixels_are_pillows_at_every_scale(mode, options):
    """simplejpeg's decode (Pillow's for CMYK) is bit for bit Pillow's, full and at 1/2, 1/4,
    1/8, for baseline, progressive, 4:4:4 and grayscale JPEGs of odd sizes."""
    buffer = io.BytesIO()
    Image.fromarray(_photo_jpeg_pixels(601, 421)).convert(mode).save(buffer, "JPEG", quality=85, **options)
    raw = buffer.getvalue()
    for k in (1, 2, 4, 8):
        pixels, _ = stream.decode(raw, lambda w, h: (0, 0, w, h), 421 // k, draft=True)
        np.testing.assert_array_equal(pixels, _pillow_decode(raw, k), err_msg=f"1/{k}")


def test_files_simplejpeg_refuses_are_pillows_to_decode_or_reject():
    """A JPEG libjpeg-turbo warns about goes to Pillow, which decodes a corrupt one (with
    libjpeg's warning ignored, as always) and rejects a truncated one."""
    import simplejpeg

    raw = _photo_jpeg(300, 200)
    whole = lambda w, h: (0, 0, w, h)
    corrupt = raw[:-200] + b"\0\0" + raw[-200:]  # "extraneous bytes before marker"
    with pytest.raises(ValueError, match="extraneous"):
        simplejpeg.decode_jpeg(corrupt, strict=True)
    np.testing.assert_array_equal(stream.decode(corrupt, whole, 200)[0], _pillow_decode(corrupt))
    with pytest.raises(OSError, match="truncated"):
        stream.decode(raw[:-2], whole, 200)


def _tf_bilinear(crop, size):
    """tf.image.resize(crop, (size, size), "bilinear") without antialiasing, in numpy: source
    coordinate (i + 0.5) * n / size - 0.5, clamped to the crop, linear between neighbours."""
    out = crop.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        low = np.floor(x).astype(int)
        high, frac = np.minimum(low + 1, n - 1), x - low
        shape = [1, 1, 1]
        shape[axis] = size
        frac = frac.reshape(shape)
        out = np.take(out, low, axis) * (1 - frac) + np.take(out, high, axis) * frac
    return out


def test_resize_without_antialiasing_is_tf_datas_bilinear():
    """antialias=False is tf.data's resize of the crop window (within OpenCV's fixed-point
    rounding, one level), shrinking and enlarging; fractional box edges round to pixels.
    Shrinking, it is another image than the antialiased resize (measured ~37 dB at 224 px
    on photos): here a 3x shrink."""
    pixels = _photo_jpeg_pixels(600, 420)
    for box, size in (((37, 11, 300, 240), 100), ((37, 11, 60, 45), 100), ((10.4, 20.6, 200.5, 150), 64)):
        left, top, w, h = box
        out = stream.crop_resize(pixels, (left, top, left + w, top + h), size, antialias=False)
        l, t, r, b = round(left), round(top), round(left + w), round(top + h)
        expected = _tf_bilinear(pixels[t:b, l:r], size)
        assert out.shape == (size, size, 3) and np.abs(out - expected).max() <= 1, box
    shrunk = stream.crop_resize(pixels, (0, 0, 300, 300), 100, antialias=False).astype(np.float64)
    smooth = stream.crop_resize(pixels, (0, 0, 300, 300), 100, antialias=True)
    assert 20 < 10 * np.log10(255 ** 2 / np.mean((shrunk - smooth) ** 2)) < 40


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uint8_reaches_the_device_and_is_normalised_there_as_on_the_host(data_dir, dtype):
    """The host-to-device copy is uint8; the step sees (x - mean) / std equal to the host's
    float32 normalisation (what the workers shipped before), padding rows zero.

    Why 2 ulp holds on any IEEE-754 CPU: x is an integer 0..255, exact in float32; both sides
    subtract the float32 mean exactly rounded; dividing by std exactly rounded would agree bit
    for bit, and XLA (which turns division by a constant into multiplication by its rounded
    reciprocal) adds at most one more rounding: relative 2^-24 for the reciprocal + 2^-24 for
    the product, under 2 ulp (measured: at most 1 ulp on XLA:CPU, jax 0.10). In bfloat16 both round the
    same float32 (or one 2-ulp neighbour) to 8 bits: within one bfloat16 ulp, 2^-8 relative."""
    import jax

    from resnet_jax.data import pipeline
    from resnet_jax.parallel import AXIS, Parallel

    config = default_config()
    config.data.update(dict(pipeline="stream", source="tfds", name="tiny_imagenet_like", data_dir=data_dir,
                            image_size=32, eval_resize=36, normalization="imagenet", workers=0,
                            train_split="train", eval_splits="val=validation"))
    config.model.dtype = dtype
    config.train.update(batch_size=8, eval_batch_size=10)
    parallel = Parallel()
    data = pipeline.create(config, parallel)
    placed = []
    shard = parallel.shard
    parallel.shard = lambda tree: placed.append({k: v.dtype for k, v in tree.items()}) or shard(tree)
    gather = lambda batch: jax.lax.all_gather(batch["image"], AXIS, tiled=True)
    data.bind(lambda state, batch, acc: (state, gather(batch)),
              lambda state, batch: gather(batch) / jax.lax.axis_size(AXIS))
    try:
        state = parallel.replicate(np.int32(0))
        _, seen = data.train(state, parallel.replicate(np.zeros(1, np.float32)), 1, 0)
        assert placed[0]["image"] == np.uint8
        reference = stream.make_stream(config, "train", train=True, global_batch_size=8, seed=0)
        host = next(reference)
        reference.close()
        expected = stream.host_normalize(host["image"], host["mask"], "imagenet")
        seen = np.asarray(jax.device_get(seen))
        assert seen.dtype == np.dtype(dtype)
        last = list(data._make("validation", False, 10))[-1]  # 3 real rows, 7 padding
        seen_eval = np.asarray(jax.device_get(data._eval(state, parallel.shard(last))))
        expected_eval = stream.host_normalize(last["image"], last["mask"], "imagenet")
        assert np.all(seen_eval[3:] == 0) and np.any(last["image"][:3] != 0)
        for got, want in ((seen, expected), (seen_eval, expected_eval)):
            if dtype == "float32":
                np.testing.assert_array_max_ulp(got, want, maxulp=2)
            else:
                np.testing.assert_allclose(got.astype(np.float32), want, rtol=2 ** -8, atol=0)
    finally:
        data.close()
