"""Classification metrics: top-k inside jitted steps, and a full report from eval outputs.

`topk_correct` is jnp and runs inside the jitted eval step, so only per-example 0/1 values
leave the device. `classification_report` works on host numpy arrays gathered after an
evaluation (labels plus logits or probabilities for every example) and returns plain Python
numbers, so it can go straight into `json.dump`.

Ties are broken the same way on both sides: among equal scores the lower class index ranks
first (`jax.lax.top_k`'s documented order, and a stable argsort on the host). That matters at
initialisation, when every logit can be equal: counting ties as "correct" would report a
0 % error for a net that has learnt nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Whether each example's label is among its k highest logits.

    Args:
      logits: [batch, num_classes] scores (logits or probabilities; only the order matters).
      labels: [batch] integer class indices.
      k: how many top classes count as a hit; clamped to num_classes, so top-5 on a
        3-class problem is top-3 (always 1) rather than an error.

    Returns:
      [batch] float32, 1.0 where the label is in the top k, else 0.0. Float so that the
      caller can multiply by a padding mask and sum across devices.
    """
    k = min(int(k), logits.shape[-1])
    # lax.top_k puts the lower index first among equal values, matching the host report.
    _, top_indices = jax.lax.top_k(logits, k)
    hit = jnp.any(top_indices == labels[..., None].astype(top_indices.dtype), axis=-1)
    return hit.astype(jnp.float32)


def _looks_like_probabilities(scores: np.ndarray) -> bool:
    """True when every row is non-negative and sums to 1 (softmax output, not logits)."""
    if scores.size == 0 or np.any(scores < 0) or np.any(scores > 1):
        return False
    return bool(np.allclose(scores.sum(axis=-1), 1.0, atol=1e-3))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax in float64 (large logits must not overflow)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _ranked_classes(scores: np.ndarray) -> np.ndarray:
    """Classes by decreasing score; ties keep the lower index first (as lax.top_k does)."""
    return np.argsort(-scores, axis=-1, kind="stable")


def classification_report(
    labels: np.ndarray,
    logits_or_probs: np.ndarray,
    class_names: Sequence[str],
    *,
    from_logits: bool | None = None,
) -> dict[str, Any]:
    """Loss, top-1/top-5 error, per-class precision/recall/F1 and the confusion matrix.

    Args:
      labels: [N] integer class indices in [0, C).
      logits_or_probs: [N, C] logits, or probabilities (rows on the simplex).
      class_names: C names, in class-index order.
      from_logits: whether `logits_or_probs` holds logits. None (default) decides from the
        values: non-negative rows that sum to 1 are taken as probabilities, anything else as
        logits. Pass it explicitly when the scores could be either.

    Returns:
      A JSON-serialisable dict (Python floats and ints only):
        num_examples, num_classes: ints.
        loss: mean cross-entropy in nats.
        accuracy: top-1 accuracy in [0, 1].
        error: top-1 error in [0, 1] (the same key as the eval records in metrics.jsonl).
        top5_error: top-min(5, C) error in [0, 1]; top5_k: that k.
        per_class: list of {class, index, precision, recall, f1, support}, one per class,
          including classes with no examples (support 0, recall 0).
        macro_avg, weighted_avg: {precision, recall, f1, support}. The macro average counts
          every class, absent ones included (as zeros); the weighted one weights by support.
        confusion_matrix: C x C list of lists of ints; rows are true classes, columns
          predicted classes.

    Raises:
      ValueError: on mismatched shapes, an empty evaluation, or labels outside [0, C).
    """
    labels = np.asarray(labels)
    scores = np.asarray(logits_or_probs, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"logits_or_probs must be [N, C], got shape {scores.shape}")
    num_examples, num_classes = scores.shape
    if labels.shape != (num_examples,):
        raise ValueError(f"labels must be [{num_examples}], got shape {labels.shape}")
    if num_examples == 0:
        raise ValueError("classification_report needs at least one example")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise ValueError("labels must be integer class indices")
        labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )

    if from_logits is None:
        from_logits = not _looks_like_probabilities(scores)
    if from_logits:
        log_probs = _log_softmax(scores)
    else:
        # A probability of exactly 0 for the true class would give an infinite loss;
        # clipping keeps the number finite and still enormous (~27.6 nats).
        log_probs = np.log(np.clip(scores, 1e-12, 1.0))
    loss = -log_probs[np.arange(num_examples), labels].mean()

    ranked = _ranked_classes(scores)
    predictions = ranked[:, 0]
    top5_k = min(5, num_classes)
    top5_hit = (ranked[:, :top5_k] == labels[:, None]).any(axis=1)
    accuracy = float((predictions == labels).mean())

    # scikit-learn (with SciPy) takes seconds to import: only a report needs it, not every
    # training process (resnet_jax.steps imports this module).
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix
    from sklearn.metrics import precision_recall_fscore_support

    # labels=range(C) so that classes absent from this split still get a row and column.
    class_indices = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=class_indices, average=None, zero_division=0
    )

    def averaged(average: str) -> dict[str, float | int]:
        p, r, f, _ = precision_recall_fscore_support(
            labels, predictions, labels=class_indices, average=average, zero_division=0
        )
        return {"precision": float(p), "recall": float(r), "f1": float(f),
                "support": int(num_examples)}

    cm = sk_confusion_matrix(labels, predictions, labels=class_indices)
    per_class = [
        {
            "class": str(class_names[i]),
            "index": i,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in class_indices
    ]
    return {
        "num_examples": int(num_examples),
        "num_classes": int(num_classes),
        "loss": float(loss),
        "accuracy": accuracy,
        "error": 1.0 - accuracy,
        "top5_error": float(1.0 - top5_hit.mean()),
        "top5_k": int(top5_k),
        "per_class": per_class,
        "macro_avg": averaged("macro"),
        "weighted_avg": averaged("weighted"),
        "confusion_matrix": cm.astype(int).tolist(),
    }


def most_confident_mistakes(
    labels: np.ndarray, logits_or_probs: np.ndarray, limit: int = 32,
    *, from_logits: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The misclassified examples the model was surest about, surest first.

    Feeds `figures.mistakes_png`, which expects its inputs already sorted.

    Args:
      labels: [N] integer class indices.
      logits_or_probs: [N, C] logits or probabilities.
      limit: at most this many examples are returned.
      from_logits: as in `classification_report`.

    Returns:
      (indices, predictions, confidences): indices into the N examples, the predicted class
      of each, and the probability the model gave that (wrong) prediction; sorted by
      decreasing confidence. Empty arrays when nothing is misclassified.
    """
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(logits_or_probs, dtype=np.float64)
    if from_logits is None:
        from_logits = not _looks_like_probabilities(scores)
    probs = np.exp(_log_softmax(scores)) if from_logits else scores
    predictions = _ranked_classes(scores)[:, 0]
    confidence = probs[np.arange(len(labels)), predictions]
    wrong = np.flatnonzero(predictions != labels)
    # Stable sort so equal confidences keep dataset order (reproducible figures).
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][: max(int(limit), 0)]
    return order, predictions[order], confidence[order]
