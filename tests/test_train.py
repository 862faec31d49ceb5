"""The training job: every data source trains, schedules, resume, augmentation,
and the one-line errors for bad configs."""

import glob
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar
from helpers import read_jsonl, restore_state, run_main, tiny_config, tree_equal
from resnet_jax import optim, train
from resnet_jax.errors import UserError
from resnet_jax.data import augment, device as device_data


def _train_ok(workdir, config):
    result = train.train_and_evaluate(config, str(workdir))
    records = read_jsonl(workdir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == config.train.total_steps // config.train.log_every
    assert losses[-1] < losses[0], losses
    evals = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in evals] == list(range(config.train.eval_every, config.train.total_steps + 1,
                                                     config.train.eval_every))
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    state, step = restore_state(workdir)
    assert step == config.train.total_steps and int(state.step) == step
    assert result["step"] == step and 0 <= result["test"]["error"] <= 1
    return result


def test_digits_source(tmp_path):
    _train_ok(tmp_path, tiny_config())


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    # Learnable: the class decides the image's brightness.
    y = rng.integers(0, 10, 600).astype(np.int64)
    x = (y[:, None, None, None] * 20 + rng.integers(0, 40, (600, 8, 8, 3))).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:500], y_train=y[:500], x_test=x[500:], y_test=y[500:])
    config = tiny_config(**{"data.source": "npz", "data.path": str(path), "data.name": "tiny",
                            "data.train_split": "train", "data.eval_splits": "test=test[:60]",
                            "train.eval_batch_size": 60, "data.flip": True})
    result = _train_ok(tmp_path / "run", config)
    assert result["test"]["examples"] == 60


def test_synthetic_source(tmp_path):
    config = tiny_config(**{"data.source": "synthetic", "data.synthetic_examples": 64, "data.image_size": 8,
                            "data.train_split": "train", "data.eval_splits": "test=train",
                            "train.eval_batch_size": 64, "data.normalization": "none"})
    _train_ok(tmp_path, config)  # memorising 64 random images: the loss must fall


def test_tfds_source(tmp_path):
    import tensorflow_datasets as tfds

    class TinyFixedImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=4)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 300), "test": self._generate_examples(1, 80)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                label = i % 4
                yield i, {"image": (label * 60 + rng.integers(0, 30, (8, 8, 3))).astype(np.uint8), "label": label}

    data_dir = str(tmp_path / "tfds")
    TinyFixedImages(data_dir=data_dir).download_and_prepare(file_format="array_record")
    config = tiny_config(**{"data.source": "tfds", "data.name": "tiny_fixed_images", "data.data_dir": data_dir,
                            "data.num_classes": 4, "data.train_split": "train[:256]",
                            "data.eval_splits": "test=test", "train.eval_batch_size": 40})
    result = _train_ok(tmp_path / "run", config)
    assert result["test"]["examples"] == 80  # exact: 2 batches of 40, nothing dropped


def test_eval_counts_every_example_once(tmp_path):
    """130 test images with eval batches of 60: the last batch is padded and masked."""
    config = tiny_config(**{"data.eval_splits": "test=test[:130]", "train.eval_batch_size": 60,
                            "train.total_steps": 10, "train.eval_every": 10})
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["test"]["examples"] == 130


# -- schedules --------------------------------------------------------------------------

def test_paper_schedule_boundaries():
    config = cifar.get_config("resnet56")
    schedule = optim.make_schedule(config.optim, 390, config.train.total_steps)
    assert config.train.total_steps == 64_000
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(31_999)) == pytest.approx(0.1)
    assert float(schedule(32_000)) == pytest.approx(0.01)
    assert float(schedule(47_999)) == pytest.approx(0.01)
    assert float(schedule(48_000)) == pytest.approx(0.001)
    assert float(schedule(63_999)) == pytest.approx(0.001)


def test_resnet110_constant_warmup():
    config = cifar.get_config("resnet110")
    schedule = optim.make_schedule(config.optim, 390, config.train.total_steps)
    assert float(schedule(0)) == pytest.approx(0.01) and float(schedule(399)) == pytest.approx(0.01)
    assert float(schedule(400)) == pytest.approx(0.1)
    assert float(schedule(32_000)) == pytest.approx(0.01)  # decays stay at absolute steps


@pytest.mark.parametrize("name,checks", [
    ("step", {0: 0.1, 299: 0.1, 300: 0.01, 600: 0.001}),  # every 30 epochs of 10 steps
    ("cosine", {100: 0.1, 600: 0.05, 1100: 0.0}),  # 100 warm-up steps, then half a cosine
    ("constant", {0: 0.1, 999: 0.1}),
    ("triangular", {100: 0.0, 600: 0.1, 1100: 0.0}),  # cycle_steps=1000 after warm-up
])
def test_schedules(name, checks):
    config = cifar.get_config("resnet20").optim
    config.schedule, config.cycle_steps = name, 1000
    if name in ("cosine", "triangular"):
        config.warmup_steps, config.warmup = 100, "linear"
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=1100)
    for step, value in checks.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), (name, step)
    if name == "cosine":
        assert float(schedule(50)) == pytest.approx(0.05)  # linear warm-up from 0


def test_onecycle_peaks_at_lr():
    config = cifar.get_config("resnet20").optim
    config.schedule = "onecycle"
    schedule = optim.make_schedule(config, 10, 1000)
    values = np.array([float(schedule(s)) for s in range(0, 1000, 10)])
    assert values.max() == pytest.approx(0.1, rel=1e-3) and values[0] < 0.01 and values[-1] < 1e-4


def test_weight_decay_mask():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 1))}, "bn": {"scale": jnp.ones(1), "bias": jnp.ones(1)}}
    assert jax.tree.leaves(optim.decay_mask(params, False)) == [False, False, True]
    assert all(jax.tree.leaves(optim.decay_mask(params, True)))
    config = cifar.get_config("resnet20").optim
    config.decay_bn_and_bias, config.lr, config.momentum, config.weight_decay = False, 1.0, 0.0, 0.5
    tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 10))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(-0.5)  # -lr * wd * w
    assert float(updates["bn"]["scale"][0]) == 0.0


# -- resume -----------------------------------------------------------------------------

def test_stop_and_rerun_resumes_bitwise(tmp_path):
    """20 steps straight vs 10 steps, then the same command to 20: identical parameters.
    A constant schedule, so stopping at 10 is the same run cut short."""
    # Chunks of 3 scanned steps plus single steps up to each stop, replayed after the resume.
    common = {"optim.schedule": "constant", "train.checkpoint_every": 5, "train.steps_per_dispatch": 3}
    run_main(tmp_path / "straight", common)
    first = run_main(tmp_path / "resumed", {**common, "train.total_steps": 10})
    second = run_main(tmp_path / "resumed", common)
    assert "from scratch" in first.stdout and "resuming at step 10" in second.stdout
    straight, _ = restore_state(tmp_path / "straight")
    resumed, step = restore_state(tmp_path / "resumed")
    assert step == 20 and tree_equal(straight, resumed)
    # No weight EMA: no state for it, no checkpoint item, no metrics.jsonl keys (the layout runs always had).
    assert straight.ema is None and sorted(n for n in os.listdir(tmp_path / "straight" / "checkpoints" / "20")
                                           if (tmp_path / "straight" / "checkpoints" / "20" / n).is_dir()) == \
        ["meta", "optimizer", "variables"]
    assert not any(key.startswith("ema") for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") for key in r)


# -- augmentation and data order --------------------------------------------------------

def test_pad_crop_stays_inside_padded_image():
    image = jnp.arange(8 * 8 * 2, dtype=jnp.float32).reshape(8, 8, 2) + 1
    padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)))
    windows = {(dy, dx): padded[dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)}
    seen = set()
    for i in range(60):
        crop = np.asarray(augment.pad_crop(image, jax.random.PRNGKey(i), 4))
        match = [offset for offset, window in windows.items() if np.array_equal(window, crop)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 20  # offsets really vary


def test_flip_is_a_mirror():
    image = jnp.arange(4 * 5 * 3, dtype=jnp.float32).reshape(4, 5, 3)
    outcomes = set()
    for i in range(40):
        out = np.asarray(augment.random_flip(image, jax.random.PRNGKey(i)))
        if np.array_equal(out, image):
            outcomes.add("same")
        else:
            np.testing.assert_array_equal(out, np.asarray(image)[:, ::-1, :])
            outcomes.add("mirrored")
    assert outcomes == {"same", "mirrored"}


def test_epoch_permutation_covers_every_example_once():
    first = np.asarray(device_data.epoch_permutation(0, 0, 1000))
    again = np.asarray(device_data.epoch_permutation(0, 0, 1000))
    second = np.asarray(device_data.epoch_permutation(0, 1, 1000))
    np.testing.assert_array_equal(np.sort(first), np.arange(1000))
    np.testing.assert_array_equal(np.sort(second), np.arange(1000))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)


def test_per_pixel_mean_normalisation():
    from resnet_jax.data.sources import Arrays

    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3)).astype(np.uint8)
    config = tiny_config()
    config.data.normalization = "per_pixel_mean"
    mean, std = device_data.normalization_stats(config.data, Arrays(images, np.zeros(50, np.int32)))
    assert mean.shape == (4, 4, 3)
    normalised = np.asarray(augment.normalize(jnp.asarray(images), mean, std))
    np.testing.assert_allclose(normalised.mean(0), 0, atol=1e-4)


# -- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,devices,message", [
    ({"model.name": "resnet57"}, 1, "unknown model 'resnet57'"),
    ({"data.source": "tfds", "data.name": "no_such_dataset_xyz"}, 1, "unknown TFDS dataset 'no_such_dataset_xyz'"),
    ({"optim.name": "rmsprop"}, 1, "unknown optim.name 'rmsprop'"),
    ({"optim.schedule": "exponential"}, 1, "unknown optim.schedule 'exponential'"),
    ({"train.batch_size": 0}, 1, "train.batch_size must be positive"),
    ({"optim.boundaries": "(10,30)", "optim.boundaries_unit": "steps", "optim.schedule": "multistep"}, 1,
     "reach past train.total_steps"),
    ({"train.batch_size": 33}, 2, "does not divide over 2 devices"),
    ({"data.source": "npz", "data.path": "/nonexistent/cifar.npz"}, 1, "data file not found: /nonexistent/cifar.npz"),
    ({"data.eval_splits": "test=validation"}, 1, "unknown split 'validation'"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, overrides, devices, message):
    """The one multi-device case runs as a real process (its fake devices must be set before
    JAX starts), which also checks the whole process's stderr and exit status; the others call
    the same entry point, resnet_jax.main.main, in this process, saving a process start each
    (its os._exit, which would end pytest, raising SystemExit with the code instead; the module
    reloaded for fresh flags, as ml_collections defines `--config.x` override flags once)."""
    workdir = tmp_path / "run"
    if devices > 1:
        result = run_main(workdir, overrides, devices=devices, check=False)
        returncode, stderr = result.returncode, result.stderr
    else:
        import importlib

        from helpers import ROOT, cli_args
        from resnet_jax import main

        main = importlib.reload(main)

        def exit_(code):
            raise SystemExit(code)

        monkeypatch.setattr(os, "_exit", exit_)
        with pytest.raises(SystemExit) as exited:
            main.main(["resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8", f"--workdir={workdir}",
                       *cli_args(overrides)])
        returncode, stderr = exited.value.code, capsys.readouterr().err
    assert returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize("flag,message", [
    ("--config=configs/nonexistent.py", "No such file or directory: 'configs/nonexistent.py'"),
    ("--config=configs/cifar.py:resnet20,cifar7", "unknown CIFAR dataset 'cifar7'"),
    ("--config.train.no_such_field=3", "no config field 'no_such_field'"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, flag, message):
    import subprocess
    import sys

    from helpers import ROOT

    args = [sys.executable, "-m", "resnet_jax.main", f"--workdir={tmp_path / 'run'}"]
    args += [flag] if flag.startswith("--config=") else ["--config=configs/cifar.py", flag]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_early_stopping_counts_evaluations(tmp_path):
    """With a vanishing lr the error cannot improve: patience 2 stops after the 3rd evaluation."""
    config = tiny_config(**{"train.total_steps": 40, "train.eval_every": 5, "train.early_stopping_patience": 2,
                            "optim.schedule": "constant", "optim.lr": 1e-12})
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 15
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "test"] == [5, 10, 15]


def test_rerunning_an_early_stopped_run_trains_no_further(tmp_path, capsys):
    """The stop is recorded in the checkpoint: the same command reports the finished run."""
    config = tiny_config(**{"train.total_steps": 40, "train.eval_every": 5, "train.early_stopping_patience": 2,
                            "optim.schedule": "constant", "optim.lr": 1e-12})
    first = train.train_and_evaluate(config, str(tmp_path))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps_saved = sorted(os.listdir(tmp_path / "checkpoints"))
    again = train.train_and_evaluate(config, str(tmp_path))
    assert first["step"] == again["step"] == 15
    assert again["test"]["error"] == first["test"]["error"]
    assert read_jsonl(tmp_path / "metrics.jsonl") == records  # nothing trained or logged
    assert sorted(os.listdir(tmp_path / "checkpoints")) == steps_saved
    assert "stopped early at step 15" in capsys.readouterr().out.strip().splitlines()[-1]


def test_imagenet_recipe_is_the_same_epochs_at_any_batch():
    """Durations in epochs: doubling the batch halves the steps, not the epochs."""
    from configs import imagenet
    from resnet_jax import config as config_lib

    config = imagenet.get_config("resnet50")
    steps_at = lambda batch: config_lib.steps(config.train.total_steps, config.train.total_epochs, 1_281_167 // batch)
    assert steps_at(256) == 90 * 5004 and steps_at(512) == 90 * 2502
    warmup = imagenet.get_config("resnet50,cosine").optim
    assert config_lib.steps(warmup.warmup_steps, warmup.warmup_epochs, 5004, "optim.warmup") == 5 * 5004
    with pytest.raises(UserError, match="train.total_steps=1000 and train.total_epochs=90 are both set"):
        config_lib.steps(1000, 90, 5004)


def test_steps_per_dispatch_auto_is_one_on_cpu_and_scans_on_accelerators():
    from resnet_jax import config as config_lib

    assert config_lib.steps_per_dispatch(0, "cpu") == 1
    assert config_lib.steps_per_dispatch(0, "gpu") == config_lib.steps_per_dispatch(0, "tpu") > 1
    assert config_lib.steps_per_dispatch(5, "cpu") == config_lib.steps_per_dispatch(5, "gpu") == 5
    trainer = train.Trainer(tiny_config(**{"train.steps_per_dispatch": 0}), __import__("resnet_jax.parallel").parallel.Parallel())
    assert trainer.steps_per_dispatch == 1  # these tests run on CPU


def test_a_run_without_eval_splits_trains_and_checkpoints(tmp_path):
    result = train.train_and_evaluate(tiny_config(**{"data.eval_splits": "", "train.total_steps": 4,
                                                     "train.checkpoint_every": 2}), str(tmp_path))
    assert result["step"] == 4 and result["best"] == {"step": None, "error": None}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert {r["split"] for r in read_jsonl(tmp_path / "metrics.jsonl")} == {"train"}
