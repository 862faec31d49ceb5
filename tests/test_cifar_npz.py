"""The official CIFAR python archives -> .npz (resnet_jax.data.cifar_npz), on tiny archives
written here in the official format; and an .npz's optional `test_exact` split: evaluated
where the file has it, skipped where it does not."""

import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from helpers import ROOT
from resnet_jax.data import cifar_npz, pipeline
from resnet_jax.errors import UserError
from resnet_jax.parallel import Parallel


class _Global:
    """A reference to module.name, written as pickle's GLOBAL opcode."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self):  # pickle asks that a reduce function be callable; it is never called
        raise NotImplementedError


class _Python2Pickler(pickle._Pickler):
    """Writes what the CIFAR batches hold (pickled by Python 2's cPickle, protocol 2): str as
    BINSTRING, numpy arrays through numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes):
        header = (pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                  else pickle.BINSTRING + struct.pack("<i", len(obj)))
        self.write(header + obj)
        self.memoize(obj)

    def _save_global_ref(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[bytes] = _save_py2_str
    dispatch[_Global] = _save_global_ref

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            return (_Global("numpy.core.multiarray", "_reconstruct"), (_Global("numpy", "ndarray"), (0,), b"b"),
                    (1, obj.shape, obj.dtype, False, obj.tobytes()))
        if isinstance(obj, np.dtype):
            return _Global("numpy", "dtype"), (obj.str[1:].encode(), 0, 1), (3, b"|", None, None, None, -1, -1, 0)
        return NotImplemented


def _python2_pickle(obj) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _rows(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 -> CIFAR's rows: 1,024 red values, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_cifar10(path, per_batch=4, test=6, dump=_python2_pickle, seed=0):
    """A cifar-10-python.tar.gz with `per_batch` images in each of the five training batches;
    returns the NHWC images and labels it holds."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (5 * per_batch + test, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, len(x))
    with tarfile.open(path, "w:gz") as archive:
        for i in range(5):
            part = slice(i * per_batch, (i + 1) * per_batch)
            _add(archive, f"cifar-10-batches-py/data_batch_{i + 1}", dump({
                b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": [int(v) for v in y[part]],
                b"data": _rows(x[part]), b"filenames": [b"x.png"] * per_batch}))
        _add(archive, "cifar-10-batches-py/test_batch", dump({
            b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y[5 * per_batch:]],
            b"data": _rows(x[5 * per_batch:]), b"filenames": [b"x.png"] * test}))
        _add(archive, "cifar-10-batches-py/batches.meta", dump({
            b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                             b"ship", b"truck"], b"num_cases_per_batch": per_batch, b"num_vis": 3072}))
    return x, y


def test_cifar10_archive_becomes_nhwc_arrays_in_order(tmp_path):
    x, y = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    shapes = cifar_npz.convert(str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "c10.npz"))
    assert shapes["kind"] == "cifar10"
    with np.load(tmp_path / "c10.npz") as npz:
        assert npz["x_train"].dtype == np.uint8 and npz["x_train"].shape == (20, 32, 32, 3)
        np.testing.assert_array_equal(npz["x_train"], x[:20])  # data_batch_1 ... 5, in order
        np.testing.assert_array_equal(npz["y_train"], y[:20])
        np.testing.assert_array_equal(npz["x_test"], x[20:])
        np.testing.assert_array_equal(npz["y_test"], y[20:])
        assert list(npz["label_names"][:2]) == ["airplane", "automobile"]
        assert not any(k.endswith("test_exact") for k in npz.files)


def test_python3_protocol2_pickles_and_cifar100_read_too(tmp_path):
    """A re-pickled archive (Python 3, protocol 2: bytes via _codecs.encode) reads the same;
    CIFAR-100 takes its fine labels."""
    x, y = make_cifar10(tmp_path / "py3.tar.gz", dump=lambda obj: pickle.dumps(obj, protocol=2))
    cifar_npz.convert(str(tmp_path / "py3.tar.gz"), str(tmp_path / "py3.npz"))
    with np.load(tmp_path / "py3.npz") as npz:
        np.testing.assert_array_equal(npz["x_test"], x[20:])
    rng = np.random.default_rng(1)
    x100 = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, 7)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as archive:
        for name, part in (("train", slice(0, 5)), ("test", slice(5, 7))):
            _add(archive, f"cifar-100-python/{name}", _python2_pickle({
                b"data": _rows(x100[part]), b"fine_labels": [int(v) for v in fine[part]],
                b"coarse_labels": [0] * len(fine[part])}))
        _add(archive, "cifar-100-python/meta", _python2_pickle({b"fine_label_names": [b"apple"] * 100}))
    assert cifar_npz.convert(str(tmp_path / "cifar-100-python.tar.gz"), str(tmp_path / "c100.npz"))["kind"] == "cifar100"
    with np.load(tmp_path / "c100.npz") as npz:
        np.testing.assert_array_equal(npz["x_train"], x100[:5])
        np.testing.assert_array_equal(npz["y_test"], fine[5:])
        assert len(npz["label_names"]) == 100


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not_tar", "cannot read"),
    ("other_tar", "not a CIFAR python archive"),
    ("no_batch_5", "lacks cifar-10-batches-py/data_batch_5"),
    ("code", "refusing posix.system"),
])
def test_bad_archives_are_one_clear_error(tmp_path, case, message):
    path = tmp_path / "archive.tar.gz"
    if case == "not_tar":
        path.write_bytes(b"<html>not found</html>")
    elif case == "other_tar":
        with tarfile.open(path, "w:gz") as archive:
            _add(archive, "README", b"hello")
    elif case == "no_batch_5":
        make_cifar10(path)
        with tarfile.open(path) as full, tarfile.open(tmp_path / "cut.tar.gz", "w:gz") as cut:
            for member in full.getmembers():
                if not member.name.endswith("data_batch_5"):
                    cut.addfile(member, full.extractfile(member))
        path = tmp_path / "cut.tar.gz"
    elif case == "code":
        with tarfile.open(path, "w:gz") as archive:
            _add(archive, "cifar-10-batches-py/test_batch", pickle.dumps({b"data": _Evil()}, protocol=2))
            for i in range(1, 6):
                _add(archive, f"cifar-10-batches-py/data_batch_{i}", pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(UserError, match=message):
        cifar_npz.convert(str(path), str(tmp_path / "out.npz"))
    assert not (tmp_path / "out.npz").exists()


def test_command_line_writes_the_file_or_says_one_error_line(tmp_path):
    make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    ok = subprocess.run([sys.executable, "-m", "resnet_jax.data.cifar_npz", "cifar-10-python.tar.gz", "c10.npz"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("wrote c10.npz: cifar10, x_train [20, 32, 32, 3]"), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "resnet_jax.data.cifar_npz", "nothing.tar.gz"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage:") and len(bad.stderr.splitlines()) == 1


def _config(path, variant="resnet8,npz"):
    from configs import cifar

    config = cifar.get_config(variant)
    config.data.path = str(path)
    return config


def test_test_exact_is_evaluated_only_where_the_npz_has_it(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 30)
    np.savez(tmp_path / "standard.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    np.savez(tmp_path / "exact.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:],
             x_test_exact=x[20:24], y_test_exact=y[20:24])
    for variant in ("resnet8,npz", "resnet8,paper,npz", "resnet8,gpu,npz"):
        assert pipeline.eval_splits(_config(tmp_path / "standard.npz", variant).data) == {"test": "test"}
        assert pipeline.eval_splits(_config(tmp_path / "exact.npz", variant).data) == {
            "test": "test", "test_exact": "test_exact"}
    # A split not marked optional is still required, sliced ones judged by their base split.
    config = _config(tmp_path / "standard.npz")
    config.data.eval_splits = "test=test,exact=test_exact[:2]?,val=train[15:]"
    assert pipeline.eval_splits(config.data) == {"test": "test", "val": "train[15:]"}
    config.train.early_stopping_split = "exact"
    with pytest.raises(UserError, match="names an optional eval split"):
        pipeline.DevicePipeline(config, Parallel())


def test_a_made_cifar10_npz_trains_and_evaluates_test(tmp_path):
    """The offline path of the README: official archive -> cifar_npz -> cifar:...,npz."""
    from resnet_jax import train

    make_cifar10(tmp_path / "cifar-10-python.tar.gz", per_batch=8, test=16)
    cifar_npz.convert(str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "cifar10.npz"))
    config = _config(tmp_path / "cifar10.npz")
    for field, value in {"total_steps": 2, "batch_size": 8, "eval_batch_size": 16, "log_every": 1, "eval_every": 2,
                         "checkpoint_every": 2, "steps_per_dispatch": 1, "progress": False}.items():
        config.train[field] = value
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 2 and result["test"]["examples"] == 16 and "test_exact" not in result
