"""Faults in the middle of a run and files that lie: a full disk at every writer, workdir
files of the wrong JSON kind, readers beside a live run. (Torch files that lie about their
sizes: tests/test_convert.py.)"""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cli_args, restore_state, run_main, tiny_config
from resnet_jax import checkpoint, reporting, steps, train
from resnet_jax import rundir
from resnet_jax.errors import DiskFull, UserError, is_disk_full

# What TensorStore (under Orbax) raises when the disk fills, as seen in a real run.
TENSORSTORE_FULL = ('RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing local file '
                    '"/run/checkpoints/20.orbax-checkpoint-tmp-1/variables/d/0": No space left on device')


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------------
# Workdir files: validated for type as well as syntax.


@pytest.mark.parametrize("content, kind", [("[1, 2, 3]", "an array"), ('"resnet20"', "a string"), ("7", "a number"),
                                           ("null", "null")])
def test_config_json_of_another_kind_is_one_error(tmp_path, content, kind):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(UserError, match=rf"config.json holds {kind}, not the JSON object of dotted keys a run "
                                        r"writes; move it away or set --config.overwrite=True"):
        rundir.prepare(tiny_config(), str(tmp_path), state_bytes=0)
    assert (tmp_path / "config.json").read_text() == content and sorted(os.listdir(tmp_path)) == ["config.json"]


def test_config_json_array_through_main_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    done = run_main(tmp_path, check=False, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: {tmp_path}/config.json holds an array, not the JSON object of dotted keys a run writes; move it "
        "away or set --config.overwrite=True"], done.stderr


def test_metrics_jsonl_lines_are_checked_and_a_cut_line_is_mended(tmp_path):
    good = '{"step": 5, "split": "train", "loss": 1.0}\n'
    for line, message in [("[1, 2]", "holds an array, not a metrics record"),
                          ('"done"', "holds a string, not a metrics record"),
                          ('{"step": "5", "split": "train"}', "holds an object, not a metrics record"),
                          ('{"step": 5, "spl', "is not JSON")]:
        (tmp_path / "metrics.jsonl").write_text(good + line + "\n" + good)
        with pytest.raises(UserError, match=rf"metrics.jsonl line 2 {message}"):
            reporting.read_metrics(str(tmp_path))
    # A last line without its newline (a kill while writing it) is not a record yet; the next
    # run's reporter removes it before appending.
    (tmp_path / "metrics.jsonl").write_text(good + '{"step": 10, "spl')
    assert reporting.read_metrics(str(tmp_path)) == [json.loads(good)]
    reporter = reporting.Reporter(str(tmp_path), total_steps=20, start_step=10)
    reporter.write({"step": 15, "split": "train", "loss": 0.5})
    reporter.close()
    assert [r["step"] for r in reporting.read_metrics(str(tmp_path))] == [5, 15]


def _tiny_state(value: float):
    import jax.numpy as jnp

    return steps.TrainState(jnp.asarray(1, jnp.int32), {"w": jnp.full((3,), value)}, {}, {"m": jnp.zeros((3,))})


def test_checkpoint_meta_of_the_wrong_kind_is_skipped(tmp_path, capsys):
    import jax

    assert checkpoint.meta_problem([1, 2]) == "its meta holds an array, not an object"
    assert "best_step" in checkpoint.meta_problem({"best_step": "12"})
    assert "image_shape" in checkpoint.meta_problem({"image_shape": [32, 32]})
    assert "normalization" in checkpoint.meta_problem({"normalization": {"mean": "x", "std": [1]}})
    assert checkpoint.meta_problem({"step": 3, "best_step": None, "image_shape": [8, 8, 3],
                                    "normalization": {"mean": [0.5], "std": [1.0]}}) is None
    # per_pixel_mean (the CIFAR recipe's) records its mean as [H][W][C]: a readable meta.
    assert checkpoint.meta_problem({"normalization": {"mean": [[[0.5, 1], [2.0, 3]]], "std": [1.0]}}) is None
    assert "normalization" in checkpoint.meta_problem({"normalization": {"mean": [[0.5, "x"]], "std": [1.0]}})
    assert "normalization" in checkpoint.meta_problem({"normalization": {"mean": [[]], "std": [1.0]}})
    saved = checkpoint.Checkpoints(str(tmp_path))
    try:
        saved.save(1, _tiny_state(1.0), {"step": 1})
        saved.save(2, _tiny_state(2.0), {"step": 2, "best_step": "one"})  # JSON, of the wrong kind
    finally:
        saved.close()
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0.0))
    reader = checkpoint.Checkpoints(str(tmp_path))
    try:
        state, meta, step = reader.restore(template)
        assert step == 1 and meta == {"step": 1} and float(state.params["w"][0]) == 1.0
        assert reader.read_meta(2) is None
    finally:
        reader.close()
    assert "checkpoint 2" in capsys.readouterr().err


def test_done_json_of_the_wrong_kind_is_no_record(tmp_path, capsys):
    from experiments import runs

    path = str(tmp_path / "done.json")
    for content in ("[1, 2]", '{"name": "r", "step": "40", "total_steps": 40, "results": {}}'):
        with open(path, "w") as f:
            f.write(content)
        assert runs.read_json(path, runs.DONE_FIELDS) is None
        assert f"warning: ignoring {path}" in capsys.readouterr().err
    record = {"name": "r", "step": 40, "total_steps": 40, "results": {}}
    runs.write_json(path, record)
    assert runs.read_json(path, runs.DONE_FIELDS) == record


# ---------------------------------------------------------------------------------------
# A full disk at each writer (injected): one error naming what, the free space and the need.


def test_disk_full_is_recognised_however_it_is_raised():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(ValueError(TENSORSTORE_FULL))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("bad"))


@pytest.mark.parametrize("raised", [ValueError(TENSORSTORE_FULL), OSError(errno.ENOSPC, "No space left on device")])
def test_checkpoint_on_a_full_disk_keeps_the_last_complete_one(tmp_path, monkeypatch, caplog, raised):
    import logging

    import jax

    saved = checkpoint.Checkpoints(str(tmp_path), keep=1, needed_bytes=5 << 20)
    try:
        saved.save(1, _tiny_state(1.0), {"step": 1})
        partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-99"
        partial.mkdir()

        def save(*args, **kwargs):  # as Orbax does: its writer thread logs the failure, then it raises
            logging.getLogger("absl").error("_SignalingThread.run() raised an exception: %s", raised)
            raise raised

        monkeypatch.setattr(saved.manager, "save", save)
        with pytest.raises(DiskFull, match=r"^no space left on device: cannot write checkpoint 2 \([\d,.]+ MiB free "
                                           rf"in {tmp_path}/checkpoints, the run needs about 5\.0 MiB\); free some "
                                           "space and run the same command again to resume"):
            saved.save(2, _tiny_state(2.0), {"step": 2})
        assert not partial.exists()  # the failed step's partial directory gives its space back
        assert not [r for r in caplog.records if "_SignalingThread" in r.getMessage()]  # one line, no log
    finally:
        monkeypatch.undo()
        saved.close()
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0.0))
    reader = checkpoint.Checkpoints(str(tmp_path))
    try:
        assert reader.restore(template)[2] == 1
    finally:
        reader.close()


def test_metrics_and_tensorboard_on_a_full_disk(tmp_path, monkeypatch):
    reporter = reporting.Reporter(str(tmp_path), total_steps=10, start_step=0, needed_bytes=3 << 20)
    monkeypatch.setattr(reporter.events, "flush", _enospc)
    with pytest.raises(DiskFull, match=r"cannot write tensorboard/ \([\d,.]+ MiB free in .*, the run needs about 3\.0"):
        reporter.write({"step": 5, "split": "train", "loss": 1.0})
    monkeypatch.setattr(reporter.jsonl, "write", _enospc)
    with pytest.raises(DiskFull, match=r"cannot write metrics.jsonl \("):
        reporter.write({"step": 10, "split": "train", "loss": 1.0})
    monkeypatch.setattr(reporter.events, "close", _enospc)
    reporter.close(quiet=True)  # another error is on its way out: nothing replaces it
    (tmp_path / "b").mkdir()
    other = reporting.Reporter(str(tmp_path / "b"), total_steps=10, start_step=0)
    monkeypatch.setattr(other.events, "close", _enospc)
    with pytest.raises(DiskFull, match="cannot write tensorboard/"):
        other.close()


def test_lock_and_config_json_on_a_full_disk(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(rundir.flatten(tiny_config())))
    before = (run / "config.json").read_text()

    def dump_half(value, f, **kwargs):
        f.write(json.dumps(value)[:10])
        f.flush()
        _enospc()

    monkeypatch.setattr(rundir.json, "dump", dump_half)
    with pytest.raises(DiskFull, match=r"cannot write .*config.json \([\d,.]+ MiB free in .*, the run needs about"):
        rundir.prepare(tiny_config(), str(run), state_bytes=1000)
    assert (run / "config.json").read_text() == before  # the old file, whole
    assert os.listdir(run) == ["config.json"]  # no partial file, and the lock it made is gone
    monkeypatch.undo()
    monkeypatch.setattr(rundir.os, "pwrite", _enospc)
    with pytest.raises(DiskFull, match=r"cannot write the lock .*\.lock \("):
        rundir.prepare(tiny_config(), str(run), state_bytes=1000)
    monkeypatch.undo()
    assert os.listdir(run) == ["config.json"]
    lock = rundir.Lock(str(run))
    lock.acquire()  # nothing was left holding it
    lock.release()


def test_cleanup_after_a_failure_never_replaces_it(tmp_path):
    """The writers fail again while the run unwinds (the same full disk): every one is still
    closed, the lock released, and the first error is the one that comes out."""
    closed = []

    class Failing:
        def __init__(self, name):
            self.name = name

        def close(self, quiet=False):
            closed.append(self.name)
            raise OSError(errno.ENOSPC, "No space left on device")

    lock = rundir.Lock(str(tmp_path))
    lock.acquire()
    train._release(Failing("reporter"), Failing("checkpoints"), Failing("data"), lock, quiet=True)
    assert closed == ["reporter", "checkpoints", "data"] and (tmp_path / ".lock").read_text() == ""
    lock.acquire()
    with pytest.raises(OSError):  # nothing on its way out: the first failure is raised, once all ran
        train._release(Failing("reporter"), None, Failing("data"), lock, quiet=False)
    assert (tmp_path / ".lock").read_text() == ""


# ---------------------------------------------------------------------------------------
# A full disk for real: a small tmpfs that the test fills while the run trains.


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory) -> str:
    """Writes a file in `directory` until the disk is full; returns its path."""
    ballast = os.path.join(directory, "ballast")
    with open(ballast, "wb", buffering=0) as f:
        block = b"\0" * (64 << 10)
        try:
            while True:
                f.write(block)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return ballast


@pytest.mark.parametrize("first", ["checkpoint", "metrics"])
def test_a_run_whose_disk_fills_ends_in_one_line_and_resumes(small_disk, first):
    """`first`: the writer that meets the full disk first (the checkpoint, Orbax and
    TensorStore underneath; or metrics.jsonl and TensorBoard, logging at every step)."""
    workdir = small_disk / "run"
    overrides = {"train.total_steps": 2000, "train.checkpoint_every": 5, "train.keep_checkpoints": 1,
                 "optim.schedule": "constant",
                 **({"train.log_every": 1000, "train.eval_every": 1000} if first == "checkpoint" else
                    {"train.log_every": 1, "train.eval_every": 1000})}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8",
                             f"--workdir={workdir}", *cli_args(overrides)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "10").is_dir():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint 10"
            time.sleep(0.05)
        ballast = _fill(small_disk)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: no space left on device: cannot write ") and " MiB free in " in lines[0], lines[0]
    if first == "checkpoint":
        assert lines[0].startswith("error: no space left on device: cannot write checkpoint "), lines[0]
    assert "the run needs about" in lines[0] and "run the same command again to resume" in lines[0]
    assert (workdir / ".lock").read_text() == ""  # released
    _, step = restore_state(workdir)  # the last complete checkpoint reads back
    assert step >= 10

    os.remove(ballast)
    again = run_main(workdir, {**overrides, "train.total_steps": step + 10}, timeout=300)
    assert f"resuming at step {step}" in again.stdout and again.returncode == 0
    assert restore_state(workdir)[1] == step + 10


# ---------------------------------------------------------------------------------------
# Readers beside a writer: a live run keeping one checkpoint, replacing it every step.


def test_readers_beside_a_live_run_read_complete_checkpoints_and_change_nothing(tmp_path):
    """evaluate, convert export, the analyses' loader and a second main, over and over while
    the trainer saves a checkpoint at every step and deletes the one before: each call
    succeeds or is one error (exit 0 or 2), and the workdir gains nothing."""
    from experiments import analysis_common
    from resnet_jax import convert, evaluate

    workdir = tmp_path / "live"
    live = {"train.total_steps": 1_000_000, "train.checkpoint_every": 1, "train.eval_every": 3,
            "train.log_every": 3, "train.keep_checkpoints": 1, "optim.schedule": "constant"}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    trainer = subprocess.Popen([sys.executable, "-m", "resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8",
                                f"--workdir={workdir}", *cli_args(live)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    outcomes = []
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "3").is_dir():
            assert trainer.poll() is None, trainer.communicate()
            assert time.time() < deadline, "no checkpoint 3"
            time.sleep(0.05)
        before, started = sorted(os.listdir(workdir)), time.time()
        readers = [
            lambda i: evaluate.report(str(workdir), "test", "latest", str(tmp_path / f"report{i}")),
            lambda i: convert.export_weights(str(workdir), str(tmp_path / f"w{i}.safetensors"), "best"),
            lambda i: analysis_common.load_run(str(workdir), "best" if i % 2 else "latest"),
        ]
        for round_ in range(9):  # a fixed number of rounds, each a few seconds at most
            try:
                readers[round_ % len(readers)](round_)
                outcomes.append(0)
            except UserError as error:  # what the command line turns into one line, exit 2
                outcomes.append(2)
                print(f"round {round_}: {error}")
            assert trainer.poll() is None, trainer.communicate()
        cli_env = dict(env, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-m", "resnet_jax.evaluate", f"--workdir={workdir}",
                               "--checkpoint=best", f"--out_dir={tmp_path / 'cli'}"],
                              capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=300)
        assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 0 or len(done.stderr.strip().splitlines()) == 1, done.stderr
        outcomes.append(done.returncode)
        second = run_main(workdir, live, check=False, timeout=300)
        assert second.returncode == 2 and "is in use by process" in second.stderr, second.stderr
        assert trainer.poll() is None, trainer.communicate()
        after = sorted(os.listdir(workdir))
        assert after == before, (before, after)  # no corrupt_checkpoints/, no report/, nothing
        kept = [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
        # The latest and the best (and, for a moment, the one before the latest, until the
        # trainer deletes it): the trainer's to delete, no one else's.
        assert 1 <= len(kept) <= 3, kept
    finally:
        trainer.kill()
        trainer.communicate()
    print("outcomes", outcomes, f"{time.time() - started:.0f} s")
    assert outcomes.count(0) >= len(outcomes) // 2, outcomes  # most reads succeed: they fall back or retry

    # Nothing readable: the advice depends on whether a run is training there.
    for step in os.listdir(workdir / "checkpoints"):
        for folder, _, files in os.walk(workdir / "checkpoints" / step / "variables"):
            for name in files:
                open(os.path.join(folder, name), "w").close()
    before = sorted(os.listdir(workdir))
    with pytest.raises(UserError, match=r"no readable checkpoint in .* \(steps \[.*\]\); resuming the run with "
                                        r"resnet_jax.main \(its config, the same --workdir\) sets unreadable steps "
                                        "aside and writes new ones"):
        convert.export_weights(str(workdir), str(tmp_path / "none.safetensors"), "latest")
    import socket

    (workdir / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # as a live trainer holds it
    with pytest.raises(UserError, match=rf"no readable checkpoint .* while process {os.getpid()} on .* trains there; "
                                        "try again after its next checkpoint"):
        evaluate.report(str(workdir), "test", "latest", str(tmp_path / "none"))
    assert sorted(os.listdir(workdir)) == before  # nothing set aside by a reader


def test_evaluate_writes_no_report_into_a_live_runs_workdir(tmp_path):
    """Beside a training run, `evaluate` without --out_dir is one error and the workdir gains
    nothing (its default report/ would be created inside the live run's folder)."""
    import socket

    from resnet_jax import evaluate

    workdir = tmp_path / "live"
    workdir.mkdir()
    (workdir / rundir.LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()}")  # this process: alive
    before = sorted(os.listdir(workdir))
    with pytest.raises(UserError, match=r"is in use by process \d+ on .*pass --out_dir=DIR"):
        evaluate.report(str(workdir))
    assert sorted(os.listdir(workdir)) == before
