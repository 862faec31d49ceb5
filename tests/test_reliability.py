"""Preemption, exact resume and bad input: real signals to real subprocesses,
really damaged checkpoint files, a really diverging loss."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT, cli_args, restore_state, run_main, tree_equal

# Long enough to be interrupted; a constant rate so a run cut short is the same run.
LONG = {"train.total_steps": 150, "train.checkpoint_every": 10, "train.eval_every": 100, "train.log_every": 10,
        "optim.schedule": "constant", "train.steps_per_dispatch": 2}


def _start(workdir, overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [sys.executable, "-m", "resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8",
            f"--workdir={workdir}", *cli_args(overrides)]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    workdir = tmp_path_factory.mktemp("straight")
    run_main(workdir, LONG)
    return restore_state(workdir)[0]


# Ten steps with checkpoints at 5 and 10: enough for a previous checkpoint to fall back to.
SHORT = {**LONG, "train.total_steps": 10, "train.checkpoint_every": 5}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One finished SHORT run, trained once; the tests that damage or reuse a finished run
    each get a copy (`_copy_of`) instead of training their own."""
    workdir = tmp_path_factory.mktemp("short")
    run_main(workdir, SHORT)
    return workdir


def _copy_of(run, workdir):
    shutil.copytree(run, workdir)
    return workdir


def test_a_second_run_into_a_busy_workdir_is_refused_touching_nothing(tmp_path):
    """The same command started twice: the second exits 2 naming the first, which trains on."""
    endless = {**LONG, "train.total_steps": 1_000_000}
    proc = _start(tmp_path, endless)
    try:
        _wait_for(tmp_path / "checkpoints" / "10", proc)
        config_written = os.stat(tmp_path / "config.json").st_mtime_ns
        second = run_main(tmp_path, endless, check=False)
        assert second.returncode == 2 and proc.poll() is None
        assert second.stderr.strip() == (f"error: {tmp_path} is in use by process {proc.pid} on "
                                         f"{socket.gethostname()}; wait for it to finish, stop it, or use another workdir")
        assert os.stat(tmp_path / "config.json").st_mtime_ns == config_written
    finally:
        proc.kill()
        proc.communicate()


def test_sigterm_checkpoints_and_resumes_bitwise(tmp_path, straight):
    proc = _start(tmp_path, LONG)
    _wait_for(tmp_path / "checkpoints" / "20", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM at step ") and "run the same command again to resume" in last
    stopped_at = int(last.split("at step ")[1].split(":")[0])
    assert 20 <= stopped_at < 150
    _, step = restore_state(tmp_path)
    assert step == stopped_at  # the checkpoint is exactly where it stopped
    resumed = run_main(tmp_path, LONG)
    assert f"resuming at step {stopped_at}" in resumed.stdout
    final, step = restore_state(tmp_path)
    assert step == 150 and tree_equal(final, straight)


def test_second_signal_exits_at_once_keeping_last_checkpoint(tmp_path):
    proc = _start(tmp_path, LONG)
    _wait_for(tmp_path / "checkpoints" / "20", proc)
    proc.send_signal(signal.SIGINT)
    # The second signal only once the first is being handled (its message is on stderr), and
    # while the run is still writing its checkpoint (measured: 0.7-1.3 s until it would exit 3).
    seen = []
    while not any("SIGINT: finishing the current step" in line for line in seen):
        line = proc.stderr.readline()
        assert line, "".join(seen)
        seen.append(line)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGINT, stderr  # 130: killed by the second, at once
    assert "SIGINT again: exiting now" in stderr and "Traceback" not in stderr
    _, step = restore_state(tmp_path)  # the newest complete checkpoint still reads
    assert step >= 20


@pytest.mark.parametrize("first,second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT),
                                          (signal.SIGINT, signal.SIGTERM)])
def test_signal_flag_second_signal_exits_with_its_code(first, second):
    """SignalFlag alone, deterministically: the first signal sets the flag, the second exits
    at once with 128 + its number (130 for Ctrl-C)."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from resnet_jax.rundir import SignalFlag
        with SignalFlag() as flag:
            os.kill(os.getpid(), {int(first)})
            time.sleep(0.2)
            assert flag.signal == signal.Signals({int(first)}).name, flag.signal
            print("flag set", flush=True)
            os.kill(os.getpid(), {int(second)})
            time.sleep(10)
        sys.exit(0)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout == "flag set\n", result.stderr
    assert result.returncode == 128 + second, result.stderr
    assert f"{signal.Signals(second).name} again: exiting now" in result.stderr


def test_kill_9_then_same_command_resumes_bitwise(tmp_path, straight):
    proc = _start(tmp_path, LONG)
    _wait_for(tmp_path / "checkpoints" / "30", proc)
    proc.kill()
    proc.communicate()
    resumed = run_main(tmp_path, LONG)
    assert "resuming at step" in resumed.stdout
    assert (f"warning: taking over the lock of {tmp_path} from process {proc.pid} on {socket.gethostname()}, "
            "which is no longer running") in resumed.stderr
    final, step = restore_state(tmp_path)
    assert step == 150 and tree_equal(final, straight)


def _truncate_largest_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 3)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, short_run):
    run = _copy_of(short_run, tmp_path / "run")
    _truncate_largest_file(run / "checkpoints" / "10")
    again = run_main(run, SHORT)
    assert "checkpoint 10" in again.stderr and "unreadable" in again.stderr
    assert "resuming at step 5" in again.stdout
    assert (run / "corrupt_checkpoints").is_dir()  # set aside, not deleted
    final, step = restore_state(run)
    assert step == 10 and tree_equal(final, restore_state(short_run)[0])  # the same as the undamaged run


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path, short_run):
    run = _copy_of(short_run, tmp_path / "run")
    for step in ("5", "10"):
        _truncate_largest_file(run / "checkpoints" / step)
    before = sorted(os.listdir(run / "checkpoints"))
    result = run_main(run, SHORT, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no readable checkpoint in ")
    # No traceback of ours. (TensorStore's threads may print asyncio "Event loop is closed"
    # tracebacks of their own while Orbax gives up on a truncated file: a known wart.)
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("File") and "resnet_jax" in line]
    assert sorted(os.listdir(run / "checkpoints")) == before  # nothing moved or overwritten


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr x 1e30 from step 15: the loss overflows within a step or two.
    exploding = {**LONG, "train.total_steps": 40, "optim.schedule": "multistep", "optim.boundaries_unit": "steps",
                 "optim.boundaries": "(15,)", "optim.decay_factor": 1e30, "train.steps_per_dispatch": 1,
                 "train.log_every": 40}
    result = run_main(tmp_path, exploding, check=False)
    assert result.returncode == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss or gradient at step ")
    bad_step = int(last.split("at step ")[1].split(";")[0])
    assert 15 <= bad_step < 20
    state, step = restore_state(tmp_path)
    assert step == 10  # the good checkpoint, and nothing written after the blow-up
    assert all(__import__("numpy").isfinite(x).all() for x in __import__("jax").tree.leaves(state.params))


def test_incompatible_config_is_refused_showing_the_difference(tmp_path, short_run):
    run = _copy_of(short_run, tmp_path / "run")
    other = run_main(run, {**SHORT, "model.name": "resnet14"}, check=False)
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds a different run" in lines[0] and "model.name: 'resnet8' -> 'resnet14'" in lines[0]
    fresh = run_main(run, {**SHORT, "model.name": "resnet14", "overwrite": True})
    assert "from scratch" in fresh.stdout
    assert '"model.name": "resnet14"' in (run / "config.json").read_text()


def test_unwritable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_main(blocker / "run", {}, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: workdir {blocker / 'run'} is not writable")
    result = run_main(blocker, {}, check=False)  # a regular file where the workdir should be
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: workdir {blocker} is not writable")
    # An existing directory without write permission. Root writes anywhere (CI runs as root),
    # so root runs the job without the capabilities that bypass file modes.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    drop = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root needs util-linux's setpriv to drop the capabilities that bypass file modes")
        caps = "-dac_override,-dac_read_search"
        drop = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([*drop, sys.executable, "-m", "resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8",
                             f"--workdir={locked}", *cli_args({})], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: workdir {locked} is not writable: Permission denied"
    assert os.listdir(locked) == []


def test_not_enough_disk_space_is_detected_before_training(tmp_path):
    from helpers import tiny_config
    from resnet_jax import rundir
    from resnet_jax.errors import UserError

    with pytest.raises(UserError, match="not enough disk space"):
        rundir.prepare(tiny_config(), str(tmp_path / "run"), state_bytes=2**62)
    assert not (tmp_path / "run" / "config.json").exists()
