"""metrics.classification_report and topk_correct, beyond tests/test_metrics_figures.py
(the cases mutation testing showed untested): messages, one example, float labels, probabilities told
from logits, numerically safe log-softmax, absent classes, the report's keys and types."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import metrics

NAMES = [str(i) for i in range(4)]


def _loss(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("labels,scores,names,message", [
    ([0], np.zeros(4), NAMES, r"^logits_or_probs must be \[N, C\], got shape \(4,\)$"),
    ([0, 1], np.zeros((3, 4)), NAMES, r"^labels must be \[3\], got shape \(2,\)$"),
    (np.zeros(0, int), np.zeros((0, 4)), NAMES, r"^classification_report needs at least one example$"),
    ([0], np.zeros((1, 4)), NAMES[:3], r"^3 class names for 4 classes$"),
    ([0.5], np.zeros((1, 4)), NAMES, r"^labels must be integer class indices$"),
    ([4], np.zeros((1, 4)), NAMES, r"^labels must lie in \[0, 4\), got \[4, 4\]$"),
    ([-1, 2], np.zeros((2, 4)), NAMES, r"^labels must lie in \[0, 4\), got \[-1, 2\]$"),
])
def test_bad_input_messages(labels, scores, names, message):
    with pytest.raises(ValueError, match=message):
        metrics.classification_report(np.asarray(labels), scores, names)


def test_one_example_and_float_labels():
    logits = np.array([[0.1, 2.0, 0.3, -1.0]])
    report = metrics.classification_report(np.array([1]), logits, NAMES)
    assert report["num_examples"] == 1 and report["error"] == 0.0
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    labels = rng.integers(0, 4, 50)
    assert metrics.classification_report(labels.astype(np.float32), logits, NAMES) == \
        metrics.classification_report(labels, logits, NAMES)


def test_report_keys_types_and_absent_classes():
    """Class 3 neither occurs nor is predicted: it still has a row, a column and zeros in
    the macro average. Everything is a plain Python number (JSON)."""
    logits = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [0, 3.0, 0, 0]])
    labels = np.array([0, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scikit-learn warning about the empty class
        report = metrics.classification_report(labels, logits, NAMES)
    assert report["num_examples"] == 4 and report["num_classes"] == 4
    assert report["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert all(type(x) is int for row in report["confusion_matrix"] for x in row)
    assert [c["index"] for c in report["per_class"]] == [0, 1, 2, 3]
    assert set(report["per_class"][3]) == {"class", "index", "precision", "recall", "f1", "support"}
    assert report["per_class"][3]["f1"] == 0.0 and report["per_class"][3]["support"] == 0
    assert set(report["macro_avg"]) == set(report["weighted_avg"]) == {"precision", "recall", "f1", "support"}
    f1s = [c["f1"] for c in report["per_class"]]
    assert report["macro_avg"]["f1"] == pytest.approx(sum(f1s) / 4)  # the absent class counts as 0
    assert report["macro_avg"]["support"] == 4


def test_probabilities_told_from_logits():
    labels = np.array([1, 0])
    one_hot = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # probabilities with exact 0 and 1
    assert metrics.classification_report(labels, one_hot, NAMES[:3])["loss"] == pytest.approx(0.0, abs=1e-9)
    rounded = np.array([[0.2, 0.79995, 0.0], [0.6, 0.2, 0.2]])  # rows sum to 1 within 1e-4
    assert metrics.classification_report(labels, rounded, NAMES[:3])["loss"] == pytest.approx(
        -np.mean(np.log([0.79995, 0.6])))
    for logits in ([[0.5, 0.7, -0.2], [0.5, 0.7, -0.2]],  # sums to 1, but negative: logits
                   [[0.5, 0.6, 0.4], [0.5, 0.6, 0.4]]):  # in [0, 1] but sums to 1.5: logits
        report = metrics.classification_report(labels, np.array(logits), NAMES[:3])
        assert report["loss"] == pytest.approx(_loss(logits, labels))
    # A probability of 0 for the true class: clipped, a large finite loss; above 1: clipped to 1.
    zero = metrics.classification_report(np.array([0]), np.array([[0.0, 1.0]]), NAMES[:2])
    assert zero["loss"] == pytest.approx(-np.log(1e-12))
    over = metrics.classification_report(np.array([0]), np.array([[1.5, 0.0]]), NAMES[:2], from_logits=False)
    assert over["loss"] == 0.0


def test_large_and_low_precision_logits():
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # rows of very different scales
    labels = np.array([0, 1])
    report = metrics.classification_report(labels, logits, NAMES[:3])
    assert np.isfinite(report["loss"]) and report["loss"] == pytest.approx(_loss(logits, labels))
    rng = np.random.default_rng(1)
    half = rng.normal(0, 3, (100, 4)).astype(np.float16)
    labels = rng.integers(0, 4, 100)
    assert metrics.classification_report(labels, half, NAMES)["loss"] == pytest.approx(_loss(half, labels), rel=1e-12)


def test_ties_rank_the_lower_class_first_with_many_classes():
    levels = np.random.default_rng(0).choice([1.0, 2.0, 3.0], (30, 40))
    ranked = metrics._ranked_classes(levels)
    for row, order in zip(levels, ranked):
        expected = np.concatenate([np.flatnonzero(row == level) for level in (3.0, 2.0, 1.0)])
        np.testing.assert_array_equal(order, expected)


def test_topk_correct_is_float32():
    hits = metrics.topk_correct(jnp.array([[0.1, 0.9], [0.8, 0.2]]), jnp.array([1, 1]), 1)
    assert hits.dtype == jnp.float32 and hits.tolist() == [1.0, 0.0]
