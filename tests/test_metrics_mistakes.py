"""metrics.most_confident_mistakes, beyond tests/test_metrics_figures.py (the
cases mutation testing showed untested): the default limit, probabilities taken as they are, ties in dataset order,
limits of 0, and full precision for low-precision scores."""

import numpy as np
import pytest

from resnet_jax import metrics


def _all_wrong(n, classes=4):
    """n examples of label 0 whose logits all favour class 1 equally: n tied mistakes."""
    logits = np.zeros((n, classes), np.float32)
    logits[:, 1] = 2.0
    return np.zeros(n, np.int64), logits


def test_default_limit_is_32():
    labels, logits = _all_wrong(100)
    indices, _, _ = metrics.most_confident_mistakes(labels, logits)
    assert len(indices) == 32


def test_ties_keep_dataset_order():
    labels, logits = _all_wrong(100)
    indices, predictions, confidence = metrics.most_confident_mistakes(labels, logits, 100)
    np.testing.assert_array_equal(indices, np.arange(100))
    assert (predictions == 1).all() and np.ptp(confidence) == 0
    # Three confidence levels over 100 mistakes: within each level, dataset order (an unstable
    # sort reorders these).
    levels = np.random.default_rng(0).choice([1.0, 2.0, 3.0], 100).astype(np.float32)
    logits[:, 1] = levels
    indices, _, confidence = metrics.most_confident_mistakes(labels, logits, 100)
    expected = np.concatenate([np.flatnonzero(levels == level) for level in (3.0, 2.0, 1.0)])
    np.testing.assert_array_equal(indices, expected)


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_zero_or_negative_is_empty(limit):
    labels, logits = _all_wrong(10)
    indices, predictions, confidence = metrics.most_confident_mistakes(labels, logits, limit)
    assert len(indices) == len(predictions) == len(confidence) == 0


def test_probabilities_are_taken_as_they_are():
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.9, 0.05, 0.05]])
    labels = np.array([0, 2, 1])
    indices, predictions, confidence = metrics.most_confident_mistakes(labels, probs)
    assert indices.tolist() == [2, 0] and predictions.tolist() == [0, 1]
    np.testing.assert_allclose(confidence, [0.9, 0.7])  # not a softmax of the probabilities
    _, _, as_logits = metrics.most_confident_mistakes(labels, probs, from_logits=True)
    assert as_logits[0] < 0.6


def test_low_precision_scores_are_computed_in_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (200, 10)).astype(np.float16)
    labels = rng.integers(0, 10, 200)
    indices, _, confidence = metrics.most_confident_mistakes(labels, logits, 200)
    exact = np.exp(logits.astype(np.float64))
    exact /= exact.sum(1, keepdims=True)
    np.testing.assert_allclose(confidence, exact.max(1)[indices], rtol=1e-9)
