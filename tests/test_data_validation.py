"""Bad data arrays: one `error:` line naming the split, the array and the fix;
exit 2; nothing written. Each case is a tiny .npz built here, trained with the digits config."""

import numpy as np
import pytest

from helpers import run_main

N_TRAIN, N_TEST = 64, 40


def _arrays(**changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (N_TRAIN, 8, 8, 1), dtype=np.uint8),
              "y_train": rng.integers(0, 10, N_TRAIN).astype(np.int64),
              "x_test": rng.integers(0, 256, (N_TEST, 8, 8, 1), dtype=np.uint8),
              "y_test": rng.integers(0, 10, N_TEST).astype(np.int64)}
    for key, change in changes.items():
        arrays[key] = change(arrays[key])
    return arrays


def _run(tmp_path, arrays=None, raw_bytes=None, extra=None, **kwargs):
    path = tmp_path / "data.npz"
    if raw_bytes is not None:
        path.write_bytes(raw_bytes)
    else:
        np.savez(path, **arrays)
    workdir = tmp_path / "run"
    overrides = {"data.source": "npz", "data.path": str(path), "data.train_split": "train",
                 "data.eval_splits": "test=test", "data.normalization": "per_channel", **(extra or {})}
    return run_main(workdir, overrides, **kwargs), workdir


def _with_label(value):
    def change(y):
        y = y.copy()
        y[3] = value
        return y
    return change


BAD = [
    ("label_too_large", _arrays(y_train=_with_label(10)), "training (train): y_train holds label 10, outside "
     "[0, 10) of data.num_classes=10; fix the labels or set --config.data.num_classes"),
    ("negative_label", _arrays(y_test=_with_label(-1)), "eval split 'test' (test): y_test holds label -1, outside [0, 10)"),
    ("lengths_differ", _arrays(y_train=lambda y: y[:-5]), "training (train): x_train has 64 images but y_train has 59 "
     "labels"),
    ("float_images", _arrays(x_train=lambda x: x.astype(np.float32) / 255), "training (train): x_train holds float32 "
     "images; store uint8 pixels 0..255, or set --config.data.float_image_max=1.0 (or 255.0)"),
    ("channels_first", _arrays(x_train=lambda x: np.repeat(x, 3, -1).transpose(0, 3, 1, 2),
                               x_test=lambda x: np.repeat(x, 3, -1).transpose(0, 3, 1, 2)),
     "training (train): x_train looks channels-first [64, 3, 8, 8]; store [N, H, W, C] (numpy: x.transpose(0, 2, 3, 1))"),
    ("test_size_differs", _arrays(x_test=lambda x: np.zeros((N_TEST, 10, 10, 1), np.uint8)),
     "eval split 'test' has images of shape [10, 10, 1], the training images [8, 8, 1]; resize them"),
    ("one_hot_labels", _arrays(y_train=lambda y: np.eye(10, dtype=np.float32)[y]),
     "training (train): y_train has shape [64, 10] (one-hot?); store class indices [N] (numpy: y.argmax(1))"),
    ("image_size_differs", _arrays(x_train=lambda x: np.zeros((N_TRAIN, 16, 16, 1), np.uint8),
                                   x_test=lambda x: np.zeros((N_TEST, 16, 16, 1), np.uint8)),
     "the training images are 16x16 but data.image_size=8; set --config.data.image_size=16"),
]


@pytest.mark.parametrize("name,arrays,message", BAD, ids=[case[0] for case in BAD])
def test_bad_arrays_are_one_line_exit_2_nothing_written(tmp_path, name, arrays, message):
    result, workdir = _run(tmp_path, arrays, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not workdir.exists()


def test_a_file_that_is_not_an_npz_is_one_line(tmp_path):
    result, workdir = _run(tmp_path, raw_bytes=b"this is not a zip archive", check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: training (train): cannot read {tmp_path / 'data.npz'} "
                                                   "as an .npz of arrays"), result.stderr
    assert "numpy.savez(path, x_train=" in lines[0] and not workdir.exists()


def test_float_images_train_once_their_scale_is_given(tmp_path):
    """[0, 1] floats with data.float_image_max=1.0 become the same uint8 pixels: the run
    trains, and [N, H, W] images get their channel axis."""
    arrays = _arrays(x_train=lambda x: x[..., 0].astype(np.float32) / 255)
    result, workdir = _run(tmp_path, arrays, extra={"data.float_image_max": 1.0, "train.total_steps": 2,
                                                    "train.eval_every": 2, "train.checkpoint_every": 2})
    assert "done: resnet8 on digits, step 2" in result.stdout
