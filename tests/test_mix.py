"""Mixup and CutMix inside the train step (resnet_jax.data.mix): timm's definitions, exact
pixels and label weights, nothing traced when off, the same on 1 or 2 devices, exact resume."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import mix_probe
from helpers import ROOT, max_abs_diff, read_jsonl, restore_state, tiny_config, tree_equal
from one_step_probe import fixed_batch
from resnet_jax import train
from resnet_jax.data import mix
from resnet_jax.parallel import Parallel
from test_parallel import CLOSE  # the bound on two runs' float noise over device counts, reasoned out there


def _data(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0,
                                      "mix_switch_prob": 0.5, **fields})


def _timm_box(lam, cy, cx, h, w):
    """timm.data.mixup.rand_bbox (margin 0) with the centre given, and cutmix_bbox_and_lam's correction."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(h * w)


def test_cutmix_box_is_timms():
    box, lam = mix.cutmix_box(jnp.float32(0.75), 1, 14, 16, 16)  # side 8, clipped at the top and right
    assert tuple(int(b) for b in box) == (0, 5, 10, 16) and float(lam) == (256 - 30) / 256
    for lam0 in (0.0, 0.1, 0.37, 0.5, 0.9, 0.999):
        for cy, cx in ((0, 0), (3, 11), (7, 2), (11, 6)):
            box, lam = mix.cutmix_box(jnp.float32(lam0), cy, cx, 12, 9)
            want_box, want_lam = _timm_box(lam0, cy, cx, 12, 9)
            assert tuple(int(b) for b in box) == want_box and float(lam) == pytest.approx(want_lam, abs=1e-7)


def _images(n=4, size=4):
    """Every pixel of the batch a different value, so a pasted pixel shows whose it is."""
    return np.arange(n * size * size, dtype=np.float32).reshape(n, size, size, 1) + 1


def test_mixup_blends_each_example_with_its_neighbour():
    images, labels = _images(), np.array([0, 1, 2, 3], np.int32)
    drawn = mix.Mix(jnp.float32(0.3), jnp.asarray(False), (0, 4, 0, 4))
    out = mix.apply({"image": images, "label": labels}, drawn, 5)
    partner = images[[1, 0, 3, 2]]
    np.testing.assert_allclose(out["image"], np.float32(0.3) * images + np.float32(0.7) * partner, rtol=1e-6)
    want = np.zeros((4, 5), np.float32)
    want[np.arange(4), labels], want[np.arange(4), labels[[1, 0, 3, 2]]] = 0.3, 0.7
    np.testing.assert_allclose(out["target"], want, atol=1e-7)
    assert out["label"].tolist() == [1, 0, 3, 2]  # the dominant label: the partner's, weight 0.7


def test_cutmix_pastes_the_box_and_weighs_labels_by_its_area():
    data, size = _data(cutmix_alpha=1.0), 16
    images, labels = _images(size=size), np.array([4, 1, 7, 2], np.int32)
    draw = jax.jit(lambda key: mix.draw(key, data, size, size))
    for seed in range(20):  # the first key whose box is neither empty nor the whole image
        drawn = draw(jax.random.PRNGKey(seed))
        top, bottom, left, right = (int(b) for b in drawn.box)
        area = (bottom - top) * (right - left)
        if 0 < area < size * size:
            break
    assert bool(drawn.cutmix) and float(drawn.lam) == (size * size - area) / (size * size)
    out = mix.apply({"image": images, "label": labels}, drawn, 10)
    partner = images[[1, 0, 3, 2]]
    inside = np.zeros((size, size), bool)
    inside[top:bottom, left:right] = True
    mixed = np.asarray(out["image"])
    assert np.array_equal(mixed[:, inside], partner[:, inside])
    assert np.array_equal(mixed[:, ~inside], images[:, ~inside])
    assert int((mixed != images).sum()) == 4 * area  # exactly the box, in every image
    rows = np.arange(4)
    own, other = np.asarray(out["target"])[rows, labels], np.asarray(out["target"])[rows, labels[[1, 0, 3, 2]]]
    assert np.all(own == np.float32((size * size - area) / (size * size)))
    assert np.all(np.abs(own + other - 1) <= 1e-7) and np.all(np.asarray(out["target"]).sum(1) == own + other)
    assert out["label"].tolist() == (labels if drawn.lam >= 0.5 else labels[[1, 0, 3, 2]]).tolist()


def test_draws_follow_mix_prob_switch_prob_and_beta():
    """2,000 batches' draws: the shares timm's _params_per_batch gives, and Beta(1, 1)'s mean."""
    data = _data(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.6, mix_switch_prob=0.25)
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    drawn = jax.jit(jax.vmap(lambda k: mix.draw(k, data, 32, 32)))(keys)
    cutmix, lam = np.asarray(drawn.cutmix), np.asarray(drawn.lam)
    applied = (lam < 1) | cutmix  # an empty CutMix box leaves lambda at 1
    assert abs(applied.mean() - 0.6) < 0.04
    assert abs(cutmix[applied].mean() - 0.25) < 0.04
    assert abs(lam[applied & ~cutmix].mean() - 0.5) < 0.03
    assert jnp.all(drawn.lam <= 1) and jnp.all(drawn.lam >= 0)


def _step_jaxpr(trainer) -> str:
    """The program of one mapped step, traced on shapes (nothing compiled)."""
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    acc = shapes(trainer.empty_accumulator())
    return str(jax.make_jaxpr(trainer.train_on_batch)(trainer.abstract_state(), shapes(fixed_batch()), acc))


def test_off_is_todays_step_and_draws_nothing():
    """The defaults, and mixing asked for on no batch (mix_prob 0), trace the very program of
    the step with the integer-label loss of before: bitwise the same step, no random draw."""
    parallel = Parallel()
    before = train.Trainer(tiny_config(), parallel)
    before.example_loss = lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    today = _step_jaxpr(before)
    assert "random_bits" not in today  # the tiny net has no dropout: its step draws nothing
    assert _step_jaxpr(train.Trainer(tiny_config(), parallel)) == today
    off = {"data.mixup_alpha": 1.0, "data.cutmix_alpha": 1.0, "data.mix_prob": 0.0}
    assert _step_jaxpr(train.Trainer(tiny_config(**off), parallel)) == today
    assert "random_bits" in _step_jaxpr(train.Trainer(tiny_config(**mix_probe.MIXING), parallel))


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    """mix_probe.py on 2 fake devices: the mixed batches, then 2 training steps."""
    base = tmp_path_factory.mktemp("mix_two_devices")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mix_probe.py"), str(base / "out.npz"),
                    str(base / "run")], env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
    return dict(np.load(base / "out.npz")), base / "run"


def test_lambda_and_box_are_the_same_on_every_device_and_the_batch_on_any_device_count(two_devices):
    probed, _ = two_devices
    assert int(probed["devices"]) == 2 and jax.device_count() == 1
    for name in ("lam", "cutmix", "box"):
        assert np.array_equal(probed[name][:, 0], probed[name][:, 1]), name
    assert probed["cutmix"][:, 0].any() and not probed["cutmix"][:, 0].all()  # both kinds were drawn
    one = mix_probe.mixed_batches()
    for name in ("image", "target", "label"):  # elementwise, no sums: bit for bit
        assert np.array_equal(one[name], probed[name]), name
    assert np.array_equal(one["lam"][:, 0], probed["lam"][:, 0])


def test_two_devices_train_like_one_with_mixing(two_devices, tmp_path):
    _, workdir = two_devices
    train.train_and_evaluate(tiny_config(**mix_probe.TWO_STEPS), str(tmp_path / "one"))
    on_two, on_one = restore_state(workdir)[0], restore_state(tmp_path / "one")[0]
    assert max_abs_diff(on_one.params, on_two.params) < CLOSE
    assert max_abs_diff(on_one.batch_stats, on_two.batch_stats) < CLOSE
    # The bound tells mixing from not mixing: the same two steps on unmixed batches land far
    # outside it (measured: 7e-8 between the device counts, 9.8e-2 to the unmixed run).
    unmixed = {k: v for k, v in mix_probe.TWO_STEPS.items() if k not in mix_probe.MIXING}
    train.train_and_evaluate(tiny_config(**unmixed), str(tmp_path / "unmixed"))
    assert max_abs_diff(on_one.params, restore_state(tmp_path / "unmixed")[0].params) > 10 * CLOSE


def test_resume_across_mixed_steps_is_bitwise(tmp_path):
    """4 mixed steps straight vs 2, then the same config to 4: identical parameters (the
    mixing keys come from (seed, step) alone)."""
    common = {**mix_probe.TWO_STEPS, "optim.schedule": "constant", "train.total_steps": 4}
    train.train_and_evaluate(tiny_config(**common), str(tmp_path / "straight"))
    train.train_and_evaluate(tiny_config(**{**common, "train.total_steps": 2}), str(tmp_path / "resumed"))
    train.train_and_evaluate(tiny_config(**common), str(tmp_path / "resumed"))
    straight, _ = restore_state(tmp_path / "straight")
    resumed, step = restore_state(tmp_path / "resumed")
    assert step == 4 and tree_equal(straight, resumed)


def test_cifar_smoke_run_with_every_recipe_knob(tmp_path):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "resnet_jax.main", "--config=configs/cifar.py:resnet8,smoke", f"--workdir={workdir}",
            "--config.data.cutmix_alpha=1.0", "--config.data.mixup_alpha=0.8", "--config.train.loss=sigmoid",
            "--config.optim.label_smoothing=0.1", "--config.train.bce_target_threshold=0.2",
            "--config.train.progress=False"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr
    assert ("training loss: sigmoid binary cross-entropy (mean over classes), label smoothing 0.1, targets above 0.2 "
            "set to 1, the rest to 0; evaluations report softmax cross-entropy on the true labels") in result.stdout
    assert ("mixing: mixup alpha 0.8 and cutmix alpha 1 on 100 % of the batches, cutmix for 50 % of them (one lambda "
            "a batch, example 2k with 2k+1 of each device's part); train loss is on the mixed targets and train err "
            "against each example's dominant label (weight >= 0.5)") in result.stdout
    records = read_jsonl(workdir / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 4 and all(np.isfinite(train_losses)) and "done:" in result.stdout
