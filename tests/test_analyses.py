"""Block deletion in the model, and the analyses of why skips help: loss landscape, lesion
study, sanity checks (experiments/landscape.py, lesion.py, sanity.py). Tiny nets on 8x8
digits or random images: seconds each."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import analysis_common as common
from experiments import landscape, lesion, sanity
from helpers import ROOT, read_jsonl, run_main, tiny_config
from resnet_jax import models

# The trained fixture also evaluates the whole training split, so the trainer's own exact
# evaluation of it is in metrics.jsonl to compare the landscape's centre with.
TRAINED = {"model.name": "resnet8", "data.eval_splits": "test=test[:120],trainset=train[:512]",
           "train.eval_batch_size": 128}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("analyses") / "resnet8")
    run_main(workdir, TRAINED)
    return workdir


def logged(workdir: str, split: str) -> dict:
    """The trainer's last evaluation of `split` in metrics.jsonl."""
    return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("split") == split][-1]


def init_run(name: str, seed: int = 0, **overrides) -> common.Run:
    """A Run of a freshly initialised net on 96 random 8x8 images (no training, no files)."""
    model = models.create(name, num_classes=10, family="cifar", **overrides)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    variables = jax.device_get(model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)), train=False))
    config = tiny_config(**{"model.name": name})
    return common.Run("/nonexistent", config, model, variables, 0, np.full(3, 127.5, np.float32),
                      np.full(3, 64.0, np.float32), lambda spec: (images, labels))


# ---------------------------------------------------------------------------------------
# drop_blocks in the model.


def test_dropped_zero_init_residual_blocks_change_no_logit():
    """A zero-initialised residual block is exactly its shortcut: deleting it (or all of
    them) leaves every logit bit-identical, on the full model's variables."""
    model = models.create("resnet14", zero_init_residual=True)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    full = np.asarray(model.apply(variables, x, train=False))
    assert model.deletable_blocks() == list(range(6))
    for dropped in [(0,), (2,), (3,), (5,), tuple(range(6))]:  # (2,) and (4,) change the shape
        np.testing.assert_array_equal(np.asarray(model.clone(drop_blocks=dropped).apply(variables, x, train=False)),
                                      full, err_msg=f"drop_blocks={dropped}")


def test_dropping_a_trained_block_changes_the_output_and_ignores_its_parameters():
    model = models.create("resnet14")
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    full = model.apply(variables, x, train=False)
    dropped = model.clone(drop_blocks=(1,))
    assert float(jnp.max(jnp.abs(dropped.apply(variables, x, train=False) - full))) > 1e-3
    # The deleted block's own parameters play no part: scrambling them changes nothing.
    scrambled = jax.tree.map(lambda v: v, variables)
    scrambled["params"]["stage1_block2"] = jax.tree.map(lambda p: p + 7.0, variables["params"]["stage1_block2"])
    np.testing.assert_array_equal(dropped.apply(scrambled, x, train=False), dropped.apply(variables, x, train=False))


def test_deleting_a_plain_block_makes_it_the_identity():
    model = models.create("plain14")
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    _, sown = model.clone(drop_blocks=(0, 1)).apply(variables, x, train=False, mutable=["intermediates"])
    # Stage 1 of plain14 is blocks 0 and 1: with both deleted its output is the stem's.
    np.testing.assert_array_equal(sown["intermediates"]["stage1"][0], sown["intermediates"]["stem"][0])


def test_blocks_that_cannot_be_deleted_are_refused():
    plain = models.create("plain20")
    assert plain.block_names()[3] == "stage2_block1"
    assert plain.deletable_blocks() == [0, 1, 2, 4, 5, 7, 8]  # not the strided, widening ones
    with pytest.raises(ValueError, match="stage2_block1.*changes the shape"):
        plain.clone(drop_blocks=(3,))
    with pytest.raises(ValueError, match="not a block index"):
        models.create("resnet20", drop_blocks=(9,))
    assert models.create("resnet20").deletable_blocks() == list(range(9))
    assert models.create("plain18").deletable_blocks() == [0, 1, 3, 5, 7]


# ---------------------------------------------------------------------------------------
# Landscape.


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


def test_filter_normalisation_gives_each_filter_the_trained_norm():
    params = init_run("resnet8").variables["params"]
    direction = landscape.filter_normalized_direction(params, np.random.default_rng(0))
    kernels = 0
    for path, weights in jax.tree_util.tree_leaves_with_path(params):
        weights, d = np.asarray(weights, np.float64), _at(direction, path).astype(np.float64)
        if weights.ndim == 1:  # BN scales and biases, the head's bias: no direction
            assert not d.any(), jax.tree_util.keystr(path)
            continue
        kernels += 1
        # One norm per filter: the output channels, flax's LAST kernel axis (HWIO, [in, out]).
        axes = tuple(range(weights.ndim - 1))
        want = np.sqrt(np.sum(weights**2, axis=axes))
        np.testing.assert_allclose(np.sqrt(np.sum(d**2, axis=axes)), want, rtol=1e-5)
        assert want.std() > 0.01 * want.mean()  # the filters' norms differ: the test can tell
        assert abs(np.corrcoef(d.ravel(), weights.ravel())[0, 1]) < 0.3  # random, not the weights
    assert kernels == 8  # resnet8: stem, 3 blocks x 2 convs, head


def test_sweep_evaluates_the_right_points_in_one_call():
    """Grid points combine the directions as theta + a d1 + b d2 (checked against a plain
    forward pass at one corner), and vmapped blocks of points give the same numbers."""
    run = init_run("resnet8")
    rng = np.random.default_rng(1)
    directions = [landscape.filter_normalized_direction(run.variables["params"], rng) for _ in range(2)]
    coords, points = landscape.grid_points(3, 0.5, 2)
    assert coords.tolist() == [-0.5, 0.0, 0.5] and points[5].tolist() == [0.5, 0.0]
    images, labels = run.load("train")
    inputs = run.normalize(images)
    loss, error = landscape.sweep(run.model, run.variables, directions, points, inputs, labels, batch=40)
    blocked = landscape.sweep(run.model, run.variables, directions, points, inputs, labels, batch=40,
                              points_per_block=4)
    np.testing.assert_allclose(blocked[0], loss, rtol=1e-4)  # vmapped convs: GPUs round differently (3e-5)
    np.testing.assert_array_equal(blocked[1], error)
    a, b = points[2]  # (0.5, -0.5)
    params = jax.tree.map(lambda w, d1, d2: w + a * d1 + b * d2, run.variables["params"], *directions)
    logits = run.model.apply({"params": params, "batch_stats": run.variables["batch_stats"]}, inputs, train=False)
    expected = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    assert loss[2] == pytest.approx(expected, rel=1e-5)
    assert error[2] == pytest.approx(float(np.mean(np.argmax(logits, -1) != labels)))
    assert len(set(np.round(loss, 4))) == len(loss)  # every point is a different network


SWEEP_ON_TWO_DEVICES = """
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from test_analyses import init_run, landscape
import jax
assert jax.device_count() == 2
run = init_run("resnet8")
rng = np.random.default_rng(1)
directions = [landscape.filter_normalized_direction(run.variables["params"], rng)]
_, points = landscape.grid_points(5, 0.5, 1)  # 5 points: padded to 6 over 2 devices
images, labels = run.load("train")
loss, error = landscape.sweep(run.model, run.variables, directions, points, run.normalize(images), labels, batch=40)
print(json.dumps([loss.tolist(), error.tolist()]))
"""


def test_sweep_splits_the_points_over_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", SWEEP_ON_TWO_DEVICES], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    two_loss, two_error = json.loads(result.stdout.strip().splitlines()[-1])
    run = init_run("resnet8")
    directions = [landscape.filter_normalized_direction(run.variables["params"], np.random.default_rng(1))]
    _, points = landscape.grid_points(5, 0.5, 1)
    images, labels = run.load("train")
    loss, error = landscape.sweep(run.model, run.variables, directions, points, run.normalize(images), labels,
                                  batch=40)
    np.testing.assert_allclose(two_loss, loss, rtol=1e-5)
    np.testing.assert_array_equal(two_error, error)


def test_landscape_centre_is_the_checkpoints_own_loss(trained):
    """At (0, 0) the landscape is the checkpoint: its loss and error on the whole training
    split equal what the trainer's own exact evaluation logged for that split and step."""
    run = common.load_run(trained)
    result = landscape.landscape(run, grid=3, span=0.5, dims=2, examples=0, seed=0, batch=128)
    own = logged(trained, "trainset")
    assert own["step"] == run.step == 20 and result["examples"] == 512
    assert result["centre"]["loss"] == pytest.approx(own["loss"], rel=1e-5)
    assert result["centre"]["error"] == pytest.approx(own["error"], abs=1e-6)
    assert result["loss"][1][1] == result["centre"]["loss"]
    assert min(map(min, result["loss"])) >= result["centre"]["loss"] - 0.05  # near a minimum
    assert max(map(max, result["loss"])) > result["centre"]["loss"] + 0.1


def test_landscape_command(trained, tmp_path, capsys):
    out = tmp_path / "land"
    code = landscape.run(["landscape", f"--workdir={trained}", f"--workdir={trained}", f"--out={out}",
                          "--grid=3", "--examples=64", "--span=0.5"])
    assert code == 0
    summary = json.loads((out / "landscape.json").read_text())
    assert summary["coords"] == [-0.5, 0.0, 0.5] and len(summary["runs"]) == 2
    first, second = summary["runs"]
    assert np.asarray(first["loss"]).shape == (3, 3) and first["examples"] == 64
    assert first["loss"] == second["loss"]  # same run, same seed: same directions and examples
    for name in ("landscape_2d.png", "landscape_1d.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "centre loss" in capsys.readouterr().out
    line = tmp_path / "line"
    assert landscape.run(["landscape", f"--workdir={trained}", f"--out={line}", "--grid=3", "--examples=64",
                          "--span=0.5", "--dims=1"]) == 0
    run = json.loads((line / "landscape.json").read_text())["runs"][0]
    assert np.asarray(run["loss"]).shape == (3,) and run["centre"] == first["centre"]
    assert sorted(os.listdir(line)) == ["landscape.json", "landscape_1d.png"]


# ---------------------------------------------------------------------------------------
# Lesion.


def test_lesion_of_zero_init_residual_blocks_changes_nothing():
    run = init_run("resnet8", zero_init_residual=True)  # blocks 1 and 2 change the shape
    result = lesion.lesion(run, "test", draws=1)
    assert result["deletable"] == [0, 1, 2]
    for single in result["single"]:
        assert (single["loss"], single["error"]) == (result["baseline_loss"], result["baseline_error"])
    assert [r["k"] for r in result["random"]] == [1, 2, 3]
    assert all(e == result["baseline_error"] for r in result["random"] for e in r["errors"])
    # Not vacuous: the same lesions of a net whose branches are not zero do change the loss.
    other = lesion.lesion(init_run("resnet8"), "test", draws=1)
    assert all(s["loss"] != other["baseline_loss"] for s in other["single"])


def test_lesion_of_a_plain_net_skips_the_shape_changing_blocks():
    run = init_run("plain14")
    result = lesion.lesion(run, "test", draws=3, seed=1)
    singles = {s["block"]: s["error"] for s in result["single"]}
    assert [b for b, e in singles.items() if e is None] == [2, 4]
    assert result["deletable"] == [0, 1, 3, 5]
    assert [len(r["errors"]) for r in result["random"]] == [3, 3, 3, 3]
    for r in result["random"]:
        assert all(len(set(d)) == r["k"] and set(d) <= {0, 1, 3, 5} for d in r["draws"])


def test_lesion_command(trained, tmp_path, capsys):
    out = tmp_path / "lesion"
    assert lesion.run(["lesion", f"--workdir={trained}", f"--out={out}", "--draws=2"]) == 0
    result = json.loads((out / "lesion.json").read_text())["runs"][0]
    # The intact net's error is the trainer's own evaluation of the same split and step.
    assert result["split"] == {"name": "test", "spec": "test[:120]"} and result["examples"] == 120
    assert result["baseline_error"] == pytest.approx(logged(trained, "test")["error"], abs=1e-6)
    assert len(result["single"]) == 3 and all(s["error"] is not None for s in result["single"])
    assert any(s["error"] != result["baseline_error"] for s in result["single"])
    assert (out / "lesion.png").read_bytes()[:4] == b"\x89PNG"
    assert "intact error" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Sanity.


def test_sanity_passes_a_healthy_config_and_fails_a_broken_one():
    checks = sanity.run_checks(tiny_config(), max_steps=60)
    assert [c.name for c in checks] == ["initial loss", "gradients", "overfit 64 images", "bf16 forward"]
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)
    loss = float(checks[0].detail.split()[0])
    assert abs(loss - math.log(10)) < 0.5
    # lr 1000: the loss explodes and 64 images are never memorised; the rest still passes.
    broken = sanity.run_checks(tiny_config(**{"optim.lr": 1000.0}), max_steps=20)
    assert [c.passed for c in broken] == [True, True, False, True]
    assert "needs 100 %" in broken[2].detail or "became" in broken[2].detail


def test_sanity_command_exits_1_when_a_check_fails(capsys):
    code = sanity.run(["sanity", f"--config={ROOT}/configs/digits.py", "--config.optim.lr=1000.0",
                       "--config.data.train_split=train[:512]", "--max_steps=10", "--bf16_tolerance=1e-9"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert [line.split()[0] for line in lines[1:5]] == ["PASS", "PASS", "FAIL", "FAIL"]
    assert lines[-1] == "2 of 4 checks passed; failed: overfit 64 images, bf16 forward"


# ---------------------------------------------------------------------------------------
# Command lines.


@pytest.mark.parametrize("module", [landscape, lesion, sanity])
def test_help_says_what_the_command_does(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.run([module.__name__, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert f"python -m {module.__name__}" in out and "flags:" in out
    assert "--examples" in out


@pytest.mark.parametrize("argv, message", [
    (["--workdir=/nonexistent/run", "--out=/tmp/x"], "no run in /nonexistent/run"),
    (["--workdir=/tmp", "--out=/tmp/x", "--grid=4"], "--grid must be odd"),
    (["--out=/tmp/x"], "--workdir is required"),
    (["--workdir=/tmp", "--out=/tmp/x", "--bogus=1"], "bad flags: Unknown command line flag 'bogus'"),
])
def test_landscape_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(common.UserError, match=message):
        landscape.run(["landscape", *argv])


def test_bad_input_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.lesion", f"--workdir={tmp_path}/none",
                             f"--out={tmp_path}/out"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no run in {tmp_path}/none (no such directory)"
    assert not os.path.exists(tmp_path / "out")
