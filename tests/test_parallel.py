"""Data parallelism, on fake CPU devices in subprocesses."""

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import ROOT, max_abs_diff, restore_state, run_main, tiny_config
from one_step_probe import fixed_batch, probe
from resnet_jax import optim, steps, train

# How far apart two correct runs on different device counts may end up. Summing a gradient
# or a BN statistic over 4 devices reassociates float32 sums, so results differ by ulps
# (1.2e-7 measured after 1 or 2 steps). The tiny net's ReLUs turn that into a larger, rare
# jump: a pre-activation within rounding of zero can take the other side of the kink on
# another device count, changing one unit's gradient (measured 8e-4 at lr 0.1 on one
# machine at step 3), and from then on training amplifies the difference step after step
# (5.7e-2 after 20 steps on one machine, 1e-4 on another). So the runs compared here are
# two steps long, where no amplification has happened yet, and the bound leaves room for a
# few kink flips. A real error lands far outside it: per-device instead of global BN moves
# the parameters by 3e-2 after one step and 8.5e-2 after two (asserted below), a wrong batch
# or seed by ~0.6.
CLOSE = 3e-3
COMPARED_STEPS = {"train.total_steps": 2, "train.log_every": 1, "train.eval_every": 2, "train.checkpoint_every": 2}


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two steps of the same run on 1 device, on 4 under shard_map and on 4 under pmap; and a
    deliberately different one (per-device BN on 4 devices) that CLOSE must tell apart. The
    one-device run trains in this process (one CPU device), the three four-device runs one
    after the other in one subprocess (tests/train_runs.py)."""
    base = tmp_path_factory.mktemp("parallel")
    out = {"base": base}
    # The four-device run also keeps its checkpoint of step 1 (checkpointing does not change
    # the state), for the resume test; the two-process test compares with it.
    four = [("four", {"train.checkpoint_every": 1}), ("four_pmap", {"parallel.backend": "pmap"}),
            ("four_per_device_bn", {"model.bn_sync": False})]
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_runs.py"),
                    json.dumps([[str(base / name), {**COMPARED_STEPS, **overrides}] for name, overrides in four])],
                   env=_env(4), check=True, capture_output=True, cwd=ROOT, timeout=600)
    assert jax.device_count() == 1
    with contextlib.redirect_stdout(io.StringIO()) as one:
        train.train_and_evaluate(tiny_config(**COMPARED_STEPS), str(base / "one"))
    stdout = {"one": one.getvalue()}
    stdout.update({name: (base / f"{name}.stdout").read_text() for name, _ in four})
    for name, devices, backend in (("one", 1, "shard_map"), ("four", 4, "shard_map"), ("four_pmap", 4, "pmap"),
                                   ("four_per_device_bn", 4, "shard_map")):
        assert f"{devices} cpu device(s) on 1 host(s), {backend}" in stdout[name]
        out[name], step = restore_state(base / name)
        assert step == 2
    return out


def test_four_devices_match_one_under_shard_map(runs):
    assert max_abs_diff(runs["one"].params, runs["four"].params) < CLOSE
    assert max_abs_diff(runs["one"].batch_stats, runs["four"].batch_stats) < CLOSE


def test_pmap_matches_one_device_and_shard_map(runs):
    assert max_abs_diff(runs["one"].params, runs["four_pmap"].params) < CLOSE
    assert max_abs_diff(runs["four"].params, runs["four_pmap"].params) < CLOSE


def test_the_bound_tells_a_real_difference_apart(runs):
    """CLOSE means something: a run that normalises each device's quarter alone, and the
    untrained state, both land at least ten times outside it."""
    assert max_abs_diff(runs["one"].params, runs["four_per_device_bn"].params) > 10 * CLOSE
    fresh = jax.device_get(train.Trainer(tiny_config(), __import__("resnet_jax.parallel").parallel.Parallel()).init_state())
    assert max_abs_diff(fresh.params, runs["one"].params) > 10 * CLOSE


def _probe(tmp_path, devices: int, cases: dict, steps: int = 1) -> dict:
    """one_step_probe.py's `cases` ({name: config overrides}) in one subprocess with
    `devices` fake devices: {name: {"before[...]"/"after[...]": array}}."""
    out = tmp_path / f"probe_{devices}.npz"
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "one_step_probe.py"), str(out), str(steps),
                    json.dumps(cases)], env=_env(devices), check=True, capture_output=True, cwd=ROOT, timeout=600)
    arrays = dict(np.load(out))
    assert int(arrays.pop("devices")) == devices
    return {name: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")} for name in cases}


def _after(probed: dict) -> list[np.ndarray]:
    return [probed[k] for k in sorted(probed) if k.startswith("after")]


@pytest.fixture(scope="module")
def probed_four(tmp_path_factory):
    """One step on 4 devices under both backends, with per-device and with global BN."""
    return _probe(tmp_path_factory.mktemp("probe"), 4, {
        f"{backend}_{sync}": {"parallel.backend": backend, "model.bn_sync": sync == "sync"}
        for backend in ("shard_map", "pmap") for sync in ("local", "sync")})


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_per_device_bn_normalises_each_quarter(probed_four, backend):
    """bn_sync=False on 4 devices == a hand-written reference: each quarter of the batch
    normalised on its own, gradients averaged, running statistics averaged."""
    probed = probed_four[f"{backend}_local"]
    config = tiny_config(**{"model.bn_sync": False})
    trainer = train.Trainer(config, __import__("resnet_jax.parallel").parallel.Parallel())
    state = jax.device_get(trainer.init_state())
    model = steps.build_model(config)  # no BN axis: each apply sees one quarter only
    batch = fixed_batch()

    def quarter_loss(params, images, labels):
        logits, updated = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updated["batch_stats"]

    grads, stats = [], []
    quarter_grad = jax.jit(jax.value_and_grad(quarter_loss, has_aux=True))  # one compile, not op by op
    for q in range(4):
        part = slice(8 * q, 8 * (q + 1))
        (_, new_stats), g = quarter_grad(
            state.params, batch["image"][part], batch["label"][part])
        grads.append(g)
        stats.append(new_stats)
    mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
    updates, _ = trainer.tx.update(mean(grads), state.opt_state, state.params)
    expected = (optax.apply_updates(state.params, updates), mean(stats))
    got = _after(probed)
    want = [np.asarray(leaf) for _, leaf in sorted(
        (("after" + jax.tree_util.keystr(p)), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(expected))]
    assert len(got) == len(want) and max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 1e-5
    # ... and differs from sync BN, which normalises over all 32 images.
    synced = probed_four[f"{backend}_sync"]
    assert max(float(np.abs(synced[k] - probed[k]).max()) for k in probed if k.startswith("after")) > 1e-4


def test_stochastic_depth_drops_the_same_blocks_on_every_device(tmp_path):
    """Batch-mode stochastic depth drops whole blocks for the global mini-batch, so 2 devices
    must drop the blocks 1 device drops (its key comes from (seed, step) alone): two steps
    on 2 devices land within CLOSE of the same two steps on 1, while dropping blocks moves
    the run far outside it (seed 0 drops blocks at steps 0 and 1). A device that draws its
    own pattern (measured once by folding the device index into the depth key) skips a
    block whose global BN another device computes: their collectives no longer match and
    the 2-device process aborts; without a collective in the block it would train another
    net on its half of the batch, outside CLOSE."""
    depth = {"model.stochastic_depth": 0.5}
    two = _probe(tmp_path, 2, {"sd": depth}, steps=2)["sd"]
    one = probe(depth, steps=2)
    without = probe({}, steps=2)
    diff = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(_after(a), _after(b)))
    assert len(_after(two)) == len(_after(one)) and diff(two, one) < CLOSE
    assert diff(one, without) > 10 * CLOSE  # blocks were dropped in these two steps


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_four_devices(runs, tmp_path):
    """jax.distributed on localhost (CPU collectives), 2 processes x 2 devices. Gloo sums in
    another order than one process does: float noise, bounded like the runs above."""
    workdir = tmp_path / "two_hosts"
    base = [sys.executable, "-m", "resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8",
            f"--workdir={workdir}", "--num_processes=2"]
    from helpers import cli_args

    # Gloo gives up on a collective after 30 s (a constant JAX does not expose), and the first
    # collective comes right after each process has compiled its step on its own: on a loaded
    # 2-core machine one process can finish compiling more than 30 s before the other. Such a
    # timeout says nothing about the code under test, so the pair runs once more, then with
    # process 0's compilations in the persistent cache. (jax_share_binary_between_hosts,
    # which would hand process 0's binaries to process 1, hung both processes here.)
    overrides = {**COMPARED_STEPS, "train.checkpoint_every": 1}
    for attempt in range(2):
        shutil.rmtree(workdir, ignore_errors=True)
        port = _free_port()
        procs = [subprocess.Popen(base + [f"--coordinator=localhost:{port}", f"--process_id={i}"] + cli_args(overrides),
                                  env=_env(2), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [p.communicate(timeout=600) for p in procs]
        failed = [stderr for p, (_, stderr) in zip(procs, outputs) if p.returncode != 0]
        if not (failed and attempt == 0 and any("gloo" in e.lower() and "timed out" in e.lower() for e in failed)):
            break
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    assert "4 cpu device(s) on 2 host(s)" in outputs[0][0]
    assert "done:" in outputs[0][0] and "done:" not in outputs[1][0]  # only process 0 reports
    two_hosts, step = restore_state(workdir)
    assert step == 2
    assert max_abs_diff(two_hosts.params, runs["four"].params) < CLOSE


def test_checkpoint_from_four_devices_resumes_on_one_and_two(runs, tmp_path):
    """The four-device run's checkpoint of step 1 (as if it had died after writing it),
    resumed on 1 and on 2 devices: step 2 lands where the four-device run did. The
    one-device resume runs in this process (one CPU device); two fake devices need their own."""
    overrides = {**COMPARED_STEPS, "train.checkpoint_every": 1}
    for devices in (1, 2):
        workdir = tmp_path / f"resumed_on_{devices}"
        shutil.copytree(runs["base"] / "four", workdir)
        shutil.rmtree(workdir / "checkpoints" / "2")
        if devices == 1:
            assert jax.device_count() == 1
            with contextlib.redirect_stdout(io.StringIO()) as out:
                train.train_and_evaluate(tiny_config(**overrides), str(workdir))
            stdout = out.getvalue()
        else:
            stdout = run_main(workdir, overrides, devices=devices).stdout
        assert f"{devices} cpu device(s)" in stdout and "resuming at step 1" in stdout
        resumed, step = restore_state(workdir)
        assert step == 2 and max_abs_diff(resumed.params, runs["four"].params) < CLOSE, devices


def test_indivisible_batch_is_one_line_exit_2(tmp_path):
    result = run_main(tmp_path / "run", {"train.batch_size": 30}, devices=4, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: train.batch_size=30 does not divide over 4 devices; "
                                     "use a multiple of 4")
