"""The training losses of modern recipes: label smoothing and sigmoid binary cross-entropy
(timm's definitions), their config fields and what a bad value says."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from resnet_jax import config as config_lib, steps
from resnet_jax.errors import UserError

LOGITS = np.array([[2.0, 0.0, -1.0]], np.float32)
LABELS = np.array([0], np.int32)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_label_smoothing_is_optax_and_timm_and_the_hand_computed_number():
    loss = float(steps.training_loss(LOGITS, {"label": LABELS}, label_smoothing=0.1)[0])
    # optax's reference: smoothed one-hot targets, then softmax cross-entropy.
    reference = optax.softmax_cross_entropy(LOGITS, optax.smooth_labels(jax.nn.one_hot(LABELS, 3), 0.1))
    assert loss == pytest.approx(float(reference[0]), abs=1e-7)
    # timm's LabelSmoothingCrossEntropy: (1 - s) * nll + s * mean over classes of -log p.
    log_p = _log_softmax(LOGITS)[0]
    assert loss == pytest.approx(0.9 * -log_p[0] + 0.1 * np.mean(-log_p), abs=1e-6)
    # By hand: targets (0.9333, 0.0333, 0.0333), log p = (-0.1698, -2.1698, -3.1698).
    assert loss == pytest.approx(0.336513, abs=1e-6)


def test_no_smoothing_is_the_integer_label_loss_bit_for_bit():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    got = steps.training_loss(logits, {"label": labels})
    assert np.array_equal(np.asarray(got), np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    # ... and the one a default config's trainer uses.
    config_loss = steps.training_loss_of(tiny_config())(logits, {"label": labels})
    assert np.array_equal(np.asarray(config_loss), np.asarray(got))


def _bce(logits, targets):
    """-[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], averaged over the classes."""
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    return np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)), -1)


def test_sigmoid_loss_is_binary_cross_entropy_averaged_over_classes():
    loss = float(steps.training_loss(LOGITS, {"label": LABELS}, loss="sigmoid")[0])
    assert loss == pytest.approx(float(_bce(LOGITS, np.array([1.0, 0.0, 0.0]))[0]), abs=1e-6)
    # By hand: (-log sigmoid(2) - log sigmoid(0) - log(1 - sigmoid(-1))) / 3.
    assert loss == pytest.approx((0.126928 + 0.693147 + 0.313262) / 3, abs=1e-6)


def test_sigmoid_loss_smooths_then_thresholds_mixed_targets():
    """timm: smoothing gives 1 - s + s/K and s/K; the threshold then makes each target 0 or 1."""
    mixed = np.array([[0.7, 0.3, 0.0]], np.float32)
    smoothed = steps.training_loss(LOGITS, {"label": LABELS, "target": mixed}, loss="sigmoid", label_smoothing=0.3)
    targets = 0.7 * mixed + 0.1  # (0.59, 0.31, 0.1)
    assert float(smoothed[0]) == pytest.approx(float(_bce(LOGITS, targets)[0]), abs=1e-6)
    thresholded = steps.training_loss(LOGITS, {"label": LABELS, "target": mixed}, loss="sigmoid",
                                      label_smoothing=0.3, bce_target_threshold=0.2)
    assert float(thresholded[0]) == pytest.approx(float(_bce(LOGITS, np.array([1.0, 1.0, 0.0]))[0]), abs=1e-6)


def test_softmax_loss_on_soft_targets_is_timms_soft_target_cross_entropy():
    mixed = np.array([[0.25, 0.0, 0.75]], np.float32)
    got = float(steps.training_loss(LOGITS, {"label": LABELS, "target": mixed})[0])
    assert got == pytest.approx(float(-(mixed * _log_softmax(LOGITS)).sum()), abs=1e-6)


def test_evaluation_loss_stays_softmax_cross_entropy_on_the_labels():
    """eval_step takes no training loss: whatever train.loss says, it reports cross-entropy
    on the integer labels (a stand-in model returns fixed logits)."""

    class FixedLogits:
        def apply(self, variables, images, train):
            return jnp.asarray(np.repeat(LOGITS, len(images), 0))

    state = types.SimpleNamespace(params={}, batch_stats={})
    batch = {"image": np.zeros((2, 8, 8, 1), np.float32), "label": np.array([0, 2], np.int32),
             "mask": np.ones(2, np.float32)}
    log_p = _log_softmax(LOGITS)[0]
    got = float(steps.eval_step(state, batch, model=FixedLogits())["loss"])
    assert got == pytest.approx(-log_p[0] - log_p[2], abs=1e-5)


def test_describe_loss_says_what_evaluation_reports():
    assert steps.describe_loss(tiny_config()) is None
    line = steps.describe_loss(tiny_config(**{"train.loss": "sigmoid", "optim.label_smoothing": 0.1,
                                              "train.bce_target_threshold": 0.2}))
    assert line == ("training loss: sigmoid binary cross-entropy (mean over classes), label smoothing 0.1, targets "
                    "above 0.2 set to 1, the rest to 0; evaluations report softmax cross-entropy on the true labels")


@pytest.mark.parametrize("overrides,devices,message", [
    ({"train.loss": "focal"}, 1, "unknown train.loss 'focal'; choose from softmax, sigmoid"),
    ({"optim.label_smoothing": 1.0}, 1, "optim.label_smoothing must be in [0, 1), got 1.0"),
    ({"optim.label_smoothing": -0.1}, 1, "optim.label_smoothing must be in [0, 1), got -0.1"),
    ({"train.loss": "sigmoid", "train.bce_target_threshold": 1.0}, 1,
     "train.bce_target_threshold must be in [0, 1) (0 = off), got 1.0"),
    ({"train.bce_target_threshold": 0.2}, 1, "train.bce_target_threshold=0.2 is only read by train.loss=sigmoid"),
    ({"data.mixup_alpha": -1.0}, 1, "data.mixup_alpha must be >= 0 (0 = off), got -1.0"),
    ({"data.cutmix_alpha": -0.5}, 1, "data.cutmix_alpha must be >= 0 (0 = off), got -0.5"),
    ({"data.mix_prob": 1.5}, 1, "data.mix_prob is a probability, in [0, 1]; got 1.5"),
    ({"data.mix_switch_prob": -0.1}, 1, "data.mix_switch_prob is a probability, in [0, 1]; got -0.1"),
    ({"data.cutmix_alpha": 1.0, "train.batch_size": 30}, 2,
     "Mixup/CutMix pairs example 2k with 2k+1 of each device's part of the batch, and train.batch_size=30 over "
     "2 device(s) is 15 a device; use a multiple of 4"),
])
def test_bad_loss_or_mixing_fields_are_one_clear_error(overrides, devices, message):
    with pytest.raises(UserError) as error:
        config_lib.validate(tiny_config(**overrides), devices)
    assert str(error.value) == message


def test_an_odd_batch_is_fine_when_nothing_mixes():
    config_lib.validate(tiny_config(**{"train.batch_size": 30}), 2)
    config_lib.validate(tiny_config(**{"train.batch_size": 30, "data.cutmix_alpha": 1.0, "data.mix_prob": 0.0}), 2)
