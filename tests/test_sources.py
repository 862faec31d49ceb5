"""resnet_jax.data.sources in-process: split slicing, array validation and the
consistency checks, each rule with the message a user reads. Fast (no training), for the
mutation run; tests/test_data_validation.py checks the same rules end to end."""

import numpy as np
import pytest

from helpers import tiny_config
from resnet_jax.data import sources
from resnet_jax.data.sources import Arrays
from resnet_jax.errors import UserError


def _arrays(n, offset=0):
    return Arrays(np.zeros((n, 2, 2, 3), np.uint8), np.arange(offset, offset + n, dtype=np.int32))


SPLITS = {"train": _arrays(200), "test": _arrays(50, 1000)}


@pytest.mark.parametrize("split,first,count", [
    ("train", 0, 200), ("test", 1000, 50), ("train[:150]", 0, 150), ("train[150:]", 150, 50),
    ("train[10:20]", 10, 10), ("train[-30:]", 170, 30), ("train[:-30]", 0, 170), ("train[90%:]", 180, 20),
    ("train[:10%]", 0, 20), ("train[25%:75%]", 50, 100), ("test[:]", 1000, 50), (" train [ :5 ] ", 0, 5),
    ("test[:33%]", 1000, 16),  # 33 * 50 // 100: rounded down, as TFDS
])
def test_slice_split(split, first, count):
    out = sources.slice_split(split, SPLITS)
    assert len(out.labels) == len(out.images) == count
    np.testing.assert_array_equal(out.labels, np.arange(first, first + count))


@pytest.mark.parametrize("split,message", [
    ("validation", "unknown split 'validation'; available: test, train (slicing like train[:45000] works)"),
    ("train[::2]", "unknown split 'train[::2]'"),
    ("train[a:b]", "unknown split"),
    ("train[5]", "unknown split"),
    ("train[100:100]", "split 'train[100:100]' is empty"),
    ("train[300:]", "is empty"),
])
def test_slice_split_refuses(split, message):
    with pytest.raises(UserError) as raised:
        sources.slice_split(split, SPLITS)
    assert message in str(raised.value)


def _data(**overrides):
    data = tiny_config().data
    data.update(overrides)
    return data


def test_validated_accepts_and_converts():
    data = _data(num_classes=10)
    labels = np.array([0, 9, 3], np.int64)
    out = sources.validated(np.full((3, 4, 4), 7, np.int64), labels, data)
    assert out.images.shape == (3, 4, 4, 1) and out.images.dtype == np.uint8 and (out.images == 7).all()
    assert out.labels.dtype == np.int32 and out.labels.tolist() == [0, 9, 3]
    rgb = np.arange(3 * 4 * 4 * 3).reshape(3, 4, 4, 3).astype(np.uint8)
    out = sources.validated(rgb, labels[:, None], data)  # [N, 1] labels: squeezed
    np.testing.assert_array_equal(out.images, rgb)
    assert out.labels.shape == (3,)
    edge = sources.validated(np.array([0, 255], np.int32).reshape(2, 1, 1, 1), np.array([0, 0]), data)
    assert edge.images.ravel().tolist() == [0, 255]  # the ends of 0..255 are fine
    for white in (1.0, 255.0):
        floats = np.array([0.0, 0.5, 1.0, 1.2, -0.1], np.float32).reshape(5, 1, 1, 1) * white
        out = sources.validated(floats, np.zeros(5, np.int32), _data(float_image_max=white))
        assert out.images.dtype == np.uint8 and out.images.ravel().tolist() == [0, 128, 255, 255, 0]
    assert len(sources.validated(np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0, np.int32), data).labels) == 0


@pytest.mark.parametrize("images,labels,overrides,message", [
    (np.zeros((4, 2, 2, 3, 1), np.uint8), np.zeros(4), {}, "x has shape [4, 2, 2, 3, 1]; images must be [N, H, W, C] or [N, H, W]"),
    (np.zeros((4, 2), np.uint8), np.zeros(4), {}, "x has shape [4, 2]"),
    (np.zeros((4, 3, 8, 8), np.uint8), np.zeros(4), {}, "x looks channels-first [4, 3, 8, 8]; store [N, H, W, C]"),
    (np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4), {}, "looks channels-first"),
    (np.zeros((4, 3, 8, 4), np.uint8), np.zeros(4), {}, "x looks channels-first [4, 3, 8, 4]"),
    (np.zeros((4, 2, 2, 3), np.float32), np.zeros(4), {}, "x holds float32 images; store uint8 pixels 0..255, or set "
                                                          "--config.data.float_image_max=1.0"),
    (np.full((4, 2, 2, 3), 256, np.int32), np.zeros(4), {}, "x holds int32 values outside 0..255; store uint8 pixels"),
    (np.full((4, 2, 2, 3), -1, np.int16), np.zeros(4), {}, "x holds int16 values outside 0..255"),
    (np.zeros((4, 2, 2, 3), bool), np.zeros(4), {}, "x holds bool values outside 0..255"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.zeros((4, 10)), {}, "y has shape [4, 10] (one-hot?); store class indices [N] "
                                                              "(numpy: y.argmax(1))"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4, np.float32), {}, "y holds float32 values; store integer class indices"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.zeros(5, np.int32), {}, "x has 4 images but y has 5 labels"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.array([0, 1, 10, 2]), {}, "y holds label 10, outside [0, 10) of "
                                                                     "data.num_classes=10; fix the labels"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.array([0, -1, 12, 2]), {}, "y holds label -1, outside [0, 10)"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.array([0, 1, 2, 3]), {"num_classes": 3}, "y holds label 3, outside [0, 3)"),
])
def test_validated_refuses(images, labels, overrides, message):
    with pytest.raises(UserError) as raised:
        sources.validated(images, labels, _data(**overrides), "x", "y")
    assert message in str(raised.value)


def test_default_array_names_in_messages():
    with pytest.raises(UserError, match=r"^images has shape \[4, 2\]"):
        sources.validated(np.zeros((4, 2), np.uint8), np.zeros(4), _data())
    with pytest.raises(UserError, match=r"^labels has shape \[4, 10\]"):
        sources.validated(np.zeros((4, 2, 2, 3), np.uint8), np.zeros((4, 10)), _data())


def test_float_images_scale_to_255():
    out = sources.validated(np.full((1, 1, 1, 1), 0.6, np.float32), np.zeros(1, np.int32), _data(float_image_max=1.0))
    assert out.images.item() == 153  # 0.6 * 255


def test_check_consistent():
    data = _data(image_size=2)
    train = _arrays(10)
    sources.check_consistent(data, train, {"test": _arrays(4)})
    with pytest.raises(UserError, match=r"the training images are 2x2 but data.image_size=8; set "
                                        r"--config.data.image_size=2"):
        sources.check_consistent(_data(image_size=8), train, {})
    with pytest.raises(UserError, match="the training images are 2x3, not square"):
        sources.check_consistent(data, Arrays(np.zeros((2, 2, 3, 1), np.uint8), np.zeros(2, np.int32)), {})
    with pytest.raises(UserError, match="the training images are 3x2, not square"):  # width right, height wrong
        sources.check_consistent(data, Arrays(np.zeros((2, 3, 2, 3), np.uint8), np.zeros(2, np.int32)), {})
    with pytest.raises(UserError, match=r"eval split 'test' has images of shape \[2, 2, 1\], the training images "
                                        r"\[2, 2, 3\]"):
        sources.check_consistent(data, train, {"test": Arrays(np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4))})


def test_split_names_and_base_split(tmp_path):
    """What an .npz holds (x_ with y_ only), for the eval splits marked optional."""
    np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 2, 2, 3), np.uint8), y_train=np.zeros(2), x_lone=np.zeros(1))
    data = tiny_config(**{"data.source": "npz", "data.path": str(tmp_path / "d.npz")}).data
    assert sources.split_names(data) == {"train"}
    data.path = str(tmp_path / "missing.npz")
    assert sources.split_names(data) is None  # loading it says why
    assert sources.split_names(tiny_config().data) is None  # not an .npz: every split is kept
    assert [sources.base_split(s) for s in ("test", "test_exact[:200]", " train [10%:] ")] == ["test", "test_exact", "train"]
