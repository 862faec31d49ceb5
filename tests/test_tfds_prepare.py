"""Preparing a real registered TFDS dataset, offline: its download metadata
resolves, and a missing network or manual download is one clear line, exit 2."""

import os
import subprocess
import sys

import pytest
import requests
import tensorflow_datasets as tfds

from helpers import ROOT
from resnet_jax.data import sources
from resnet_jax.errors import UserError


def test_cifar10_download_metadata_resolves_offline():
    """TFDS 4.9.10 needs importlib_resources here without declaring it: without it, the download path crashes."""
    url_infos = tfds.builder("cifar10").url_infos
    assert len(url_infos) == 1
    (url, info), = url_infos.items()
    assert url.endswith("cifar-10-binary.tar.gz") and int(info.size) == 170052171


def test_unreachable_host_is_one_line_naming_the_offline_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "_reachable", lambda host, timeout_s=10.0: False)
    with pytest.raises(UserError) as error:
        sources.prepare_tfds("cifar10", str(tmp_path))
    assert str(error.value) == ("cannot download cifar10 (cannot reach www.cs.toronto.edu): connect to the internet "
                                "once, or use --config.data.source=npz --config.data.path=FILE")
    announced = capsys.readouterr().err
    assert f"downloading 162 MiB from www.cs.toronto.edu into {tmp_path}/downloads" in announced


def test_download_failing_inside_tfds_is_one_line(tmp_path, monkeypatch):
    """The network call itself fails (host reachable a moment before): TFDS's own download
    path runs, and its ConnectionError becomes the same line."""
    monkeypatch.setattr(sources, "_reachable", lambda host, timeout_s=10.0: True)

    def refuse(self, request, **kwargs):
        raise requests.exceptions.ConnectionError(f"refused by the test: {request.url}")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", refuse)
    with pytest.raises(UserError) as error:
        sources.prepare_tfds("cifar10", str(tmp_path))
    message = str(error.value)
    assert message.startswith("cannot download cifar10 (") and "refused by the test" in message
    assert message.endswith("connect to the internet once, or use --config.data.source=npz --config.data.path=FILE")
    # Nothing half-prepared is left that a later run would take for the dataset.
    assert not tfds.builder("cifar10", data_dir=str(tmp_path)).is_prepared()


def test_manual_dataset_says_where_the_files_go(tmp_path):
    with pytest.raises(UserError) as error:
        sources.prepare_tfds("imagenet2012", str(tmp_path))
    message = str(error.value)
    manual_dir = os.path.join(tmp_path, "downloads", "manual")
    assert message.startswith("imagenet2012 must be downloaded by hand: ")
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert f"Put the files in {manual_dir}" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir={manual_dir}" in message


def test_main_job_offline_is_one_error_line_exit_2(tmp_path):
    """The README's main job, with TFDS's network unreachable: one line, exit 2, no workdir."""
    probe = ("import socket\n"
             "def refuse(*a, **k): raise OSError('no network (test)')\n"
             "socket.create_connection = refuse\n"
             "import sys; from resnet_jax import main; sys.argv = sys.argv[:1] + sys.argv[1:]; main.main()\n")
    workdir = tmp_path / "r20"
    result = subprocess.run(
        [sys.executable, "-c", probe, "--config=configs/cifar.py:resnet20", f"--workdir={workdir}",
         f"--config.data.data_dir={tmp_path / 'tfds'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: cannot download cifar10 (cannot reach www.cs.toronto.edu): connect to the internet once, "
                    "or use --config.data.source=npz --config.data.path=FILE")
    assert "Traceback" not in result.stderr and not workdir.exists()
