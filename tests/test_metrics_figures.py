"""metrics.py against direct numpy computations; every figure writes a real, non-blank PNG."""

import json

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from resnet_jax import figures, metrics

# ---------------------------------------------------------------------------- metrics


def _random_eval(seed: int, num_examples: int, num_classes: int, absent: int | None = None):
    """Labels and logits that are right most of the time, optionally missing one class."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(num_classes) if c != absent]
    labels = rng.choice(present, size=num_examples)
    logits = rng.normal(size=(num_examples, num_classes)).astype(np.float32)
    logits[np.arange(num_examples), labels] += 1.5
    return labels, logits


def test_report_matches_numpy_with_an_absent_class():
    num_classes, absent = 7, 4
    labels, logits = _random_eval(0, 500, num_classes, absent=absent)
    names = [f"c{i}" for i in range(num_classes)]
    report = metrics.classification_report(labels, logits, names)

    predictions = logits.argmax(axis=1)
    cm = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(cm, (labels, predictions), 1)
    assert report["confusion_matrix"] == cm.tolist()
    assert report["accuracy"] == pytest.approx((predictions == labels).mean())
    assert report["error"] == pytest.approx(1 - (predictions == labels).mean())

    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert report["loss"] == pytest.approx(-log_probs[np.arange(len(labels)), labels].mean())

    rows, cols = cm.sum(axis=1), cm.sum(axis=0)
    recall = np.divide(np.diag(cm), rows, out=np.zeros(num_classes), where=rows > 0)
    precision = np.divide(np.diag(cm), cols, out=np.zeros(num_classes), where=cols > 0)
    per_class = report["per_class"]
    assert [c["class"] for c in per_class] == names
    np.testing.assert_allclose([c["recall"] for c in per_class], recall)
    np.testing.assert_allclose([c["precision"] for c in per_class], precision)
    assert [c["support"] for c in per_class] == rows.tolist()
    # The absent class still has its row: support 0, recall 0 (zero_division=0).
    assert per_class[absent]["support"] == 0 and per_class[absent]["recall"] == 0.0
    assert report["macro_avg"]["recall"] == pytest.approx(recall.mean())
    assert report["weighted_avg"]["recall"] == pytest.approx((recall * rows).sum() / rows.sum())
    # Weighted recall is accuracy, by definition.
    assert report["weighted_avg"]["recall"] == pytest.approx(report["accuracy"])

    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert report["top5_error"] == pytest.approx(1 - (top5 == labels[:, None]).any(1).mean())
    json.dumps(report)  # plain Python numbers only


def test_report_from_probabilities_gives_the_same_numbers():
    labels, logits = _random_eval(1, 200, 5)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    from_logits = metrics.classification_report(labels, logits, list("abcde"))
    from_probs = metrics.classification_report(labels, probs, list("abcde"))
    assert from_probs["loss"] == pytest.approx(from_logits["loss"], rel=1e-5)
    assert from_probs["confusion_matrix"] == from_logits["confusion_matrix"]


def test_top5_with_fewer_than_five_classes_is_top_all():
    labels, logits = _random_eval(2, 100, 3)
    report = metrics.classification_report(labels, logits, ["a", "b", "c"])
    assert report["top5_k"] == 3
    assert report["top5_error"] == 0.0
    assert np.all(np.asarray(metrics.topk_correct(jnp.asarray(logits), jnp.asarray(labels), 5))
                  == 1.0)


def test_report_rejects_bad_input():
    labels, logits = _random_eval(3, 10, 4)
    with pytest.raises(ValueError, match="class names"):
        metrics.classification_report(labels, logits, ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.classification_report(labels + 4, logits, list("abcd"))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_correct_matches_numpy_argsort(k):
    labels, logits = _random_eval(4, 300, 10)
    expected = (np.argsort(-logits, axis=1)[:, :k] == labels[:, None]).any(axis=1)
    got = jax.jit(metrics.topk_correct, static_argnums=2)(logits, labels, k)
    assert got.dtype == jnp.float32 and got.shape == (300,)
    np.testing.assert_array_equal(np.asarray(got), expected.astype(np.float32))


def test_ties_do_not_count_as_hits():
    # Equal logits (a net at initialisation) must not score 0 % error: ties go to the lower
    # index, on device and on host alike.
    logits = np.zeros((4, 10), np.float32)
    labels = np.array([0, 3, 9, 1])
    np.testing.assert_array_equal(np.asarray(metrics.topk_correct(logits, labels, 1)),
                                  [1, 0, 0, 0])
    report = metrics.classification_report(labels, logits, [str(i) for i in range(10)])
    assert report["error"] == pytest.approx(0.75)


def test_most_confident_mistakes_are_sorted_wrong_predictions():
    labels, logits = _random_eval(5, 300, 6)
    indices, predictions, confidence = metrics.most_confident_mistakes(labels, logits, 10)
    assert len(indices) == 10
    assert np.all(predictions != labels[indices])
    assert np.all(np.diff(confidence) <= 0)
    wrong = logits.argmax(1) != labels
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert confidence[0] == pytest.approx(probs.max(1)[wrong].max(), rel=1e-5)


# ---------------------------------------------------------------------------- figures


def _assert_png(path, min_width=300, min_height=150):
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    assert image[..., :3].std() > 0.01, "blank image"


def test_confusion_matrix_png(tmp_path):
    labels, logits = _random_eval(6, 400, 10)
    cm = np.array(metrics.classification_report(
        labels, logits, [f"class{i}" for i in range(10)])["confusion_matrix"])
    _assert_png(figures.confusion_matrix_png(cm, [f"class{i}" for i in range(10)],
                                             tmp_path / "cm10.png"), 500, 500)
    big = np.random.default_rng(0).integers(0, 20, (100, 100)) + 200 * np.eye(100, dtype=int)
    big[7] = 0  # a class with no examples: its row is zeros, not NaN
    _assert_png(figures.confusion_matrix_png(big, [f"n{i}" for i in range(100)],
                                             tmp_path / "cm100.png"), 1000, 1000)


@pytest.mark.parametrize("channels", [1, 3])
def test_mistakes_png(tmp_path, channels):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (10, 8, 8, channels), dtype=np.uint8)
    path = figures.mistakes_png(images, np.arange(10) % 3, (np.arange(10) + 1) % 3,
                                np.linspace(0.99, 0.5, 10), ["cat", "dog", "ship"],
                                tmp_path / "sub" / "mistakes.png", ncols=4)
    _assert_png(path, 400, 300)
    # Normalised float inputs (outside [0, 1]) and no mistakes at all are both drawn.
    floats = rng.normal(size=(3, 8, 8, channels)).astype(np.float32)
    _assert_png(figures.mistakes_png(floats, [0, 1, 2], [1, 2, 0], [0.9, 0.8, 0.7],
                                     ["cat", "dog", "ship"], tmp_path / "f.png"), 300, 150)
    _assert_png(figures.mistakes_png(floats[:0], [], [], [], ["cat"], tmp_path / "none.png"),
                200, 100)


def test_activations_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 16, 16, 3))
    activations = {"stem": np.maximum(rng.normal(size=(5, 16, 16, 16)), 0),
                   "stage1": np.maximum(rng.normal(size=(5, 16, 16, 4)), 0),  # < channels
                   "stage2": np.maximum(rng.normal(size=(5, 8, 8, 32)), 0),
                   "stage3": np.zeros((5, 4, 4, 64))}  # a dead layer must not divide by 0
    _assert_png(figures.activations_png(images, activations, tmp_path / "act.png"), 800, 300)


def test_curves_png(tmp_path):
    records = []
    for step in range(0, 2001, 50):
        records.append({"step": step, "split": "train", "loss": 2.3 * np.exp(-step / 500) + 0.1,
                        "error": 0.9 * np.exp(-step / 500) + 0.05, "lr": 0.1,
                        "grad_norm": 1.0, "images_per_sec": 1e4})
        if step % 500 == 0:
            records.append({"step": step, "split": "test", "loss": 2.3 * np.exp(-step / 600),
                            "error": 0.9 * np.exp(-step / 600) + 0.1, "top5_error": 0.02})
    records.append({"step": 2001, "split": "train", "lr": 0.01})  # partial record
    _assert_png(figures.curves_png(records, tmp_path / "curves.png"), 800, 300)
    _assert_png(figures.curves_png([], tmp_path / "empty.png"), 200, 100)
