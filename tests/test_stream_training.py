"""The trainer on the streaming pipeline: the ImageNet recipe trains a few steps
from a tiny TFDS dataset of JPEGs, and resumes the exact data order from its checkpoint."""

import contextlib
import io
import re
import shutil

import pytest

import tiny_imagenet_builder
from configs import imagenet
from helpers import restore_state, tree_equal
from resnet_jax import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tiny_imagenet_builder.prepare_tiny(path)
    return path


def _config(data_dir, total_steps):
    config = imagenet.get_config("resnet18")
    config.data.name, config.data.data_dir = tiny_imagenet_builder.NAME, data_dir
    config.data.num_classes = tiny_imagenet_builder.NUM_CLASSES
    config.data.image_size, config.data.eval_resize, config.data.workers = 32, 36, 0
    config.model.dtype = "float32"
    config.train.batch_size, config.train.eval_batch_size = 8, 8
    config.train.total_steps, config.train.total_epochs, config.train.log_every = total_steps, 0, 2
    config.train.eval_every, config.train.checkpoint_every = 4, 2
    config.train.progress = False
    config.optim.schedule = "constant"
    return config


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, data_dir):
    """One 4-step run (checkpoints at 2 and 4) with what it printed, shared: the recipe test
    reads its output, the draft test evaluates its checkpoint, the resume test continues a copy."""
    workdir = tmp_path_factory.mktemp("four_steps")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train.train_and_evaluate(_config(data_dir, 4), str(workdir))
    return workdir, result, out.getvalue()


def test_imagenet_recipe_trains_through_the_stream(four_steps):
    _, result, out = four_steps
    assert result["val"]["examples"] == tiny_imagenet_builder.SPLIT_SIZES["validation"]  # exact, padded
    assert result["step"] == 4
    # Workers sized by measurement: what the input delivers at the start, what the model
    # consumed after the first log period (once).
    assert re.search(r"input: the main process \(data.workers=0\) delivers about [\d,]+ images/s", out), out
    assert out.count("input: the model consumes about") == 1


def test_input_bottleneck_is_warned_about():
    from resnet_jax.data import pipeline

    config = _config("", 4)
    config.data.workers = 2
    now = [0.0]
    rate = pipeline._InputRate(config)
    rate.clock = lambda: now[0]
    rate.per_worker, rate.delivered = 50.0, 100.0
    rate.stepped(0.0, 8)  # the compiling step: not measured
    for _ in range(4):  # 8 images a step in 0.1 s, 0.05 s of it waiting for the batch
        now[0] += 0.1
        rate.stepped(0.05, 8)
    lines = rate.log_notes()
    assert "consumes about 160 images/s" in lines[0] and "trained 80/s" in lines[0] and "50% of the time" in lines[0]
    assert lines[1] == ("warning: input is the bottleneck: the workers deliver about 100 images/s; "
                        "about 4 workers would keep up (data.workers)")
    assert rate.log_notes() == []  # once
    quiet = pipeline._InputRate(config)
    quiet.clock = lambda: now[0]
    quiet.per_worker, quiet.delivered = 500.0, 1000.0
    for _ in range(3):
        now[0] += 0.1
        quiet.stepped(0.0, 8)
    assert len(quiet.log_notes()) == 1  # no warning: the step never waited, input is ample


def test_resume_continues_the_stream_exactly(tmp_path, data_dir, four_steps):
    train.train_and_evaluate(_config(data_dir, 6), str(tmp_path / "straight"))
    shutil.copytree(four_steps[0], tmp_path / "resumed")
    train.train_and_evaluate(_config(data_dir, 6), str(tmp_path / "resumed"))  # continues from step 4
    straight, _ = restore_state(tmp_path / "straight")
    resumed, step = restore_state(tmp_path / "resumed")
    assert step == 6 and tree_equal(straight, resumed)


# Measured (2026-12-02, XLA:CPU): with draft decoding on, 8 of the 23 validation images (the
# 100 x 80 and 120 x 100 ones: shorter side >= 2 x eval_resize) are decoded at 1/2; the error
# of this 4-step checkpoint does not change (no prediction flips) and its mean loss changes
# by 0.0011 in the environment where this was first measured, 0.0023 in a fresh one later the
# same day (identical input pixels; the 4-step checkpoint itself differs between installs).
# The loss bound is ~2x the larger measurement: it is a property of one small checkpoint, not
# a decoder constant; the error bound (no prediction changes) is the claim that matters.
MEASURED_ERROR_CHANGE = 0.0
MEASURED_LOSS_CHANGE = 0.005


def test_draft_decoding_changes_a_fixed_checkpoints_error_at_most_as_measured(data_dir, four_steps):
    from helpers import restore_state
    from resnet_jax.parallel import Parallel

    config = _config(data_dir, 4)
    state, step = restore_state(four_steps[0], 4)
    assert step == 4
    results = {}
    for draft in (False, True):
        config.data.jpeg_draft = draft
        trainer = train.Trainer(config, Parallel())
        try:
            results[draft] = trainer.data.evaluate(trainer.parallel.replicate(state))["val"]
        finally:
            trainer.data.close()
    assert results[True]["loss"] != results[False]["loss"]  # the draft is in effect
    assert abs(results[True]["error"] - results[False]["error"]) <= MEASURED_ERROR_CHANGE
    assert abs(results[True]["loss"] - results[False]["loss"]) < MEASURED_LOSS_CHANGE
