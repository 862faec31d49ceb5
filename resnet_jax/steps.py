"""The pure-JAX core of training: TrainState, the model a config names, the loss, the
per-device train and eval steps, and the device-side metric sums. No I/O.

`train_step` and `eval_step` are written for one device with collectives over the "data"
axis (`axis_name=None`: one device, no collectives); resnet_jax.parallel maps them over
every device and the data pipeline feeds them.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax import config as config_lib
from resnet_jax import ema as ema_lib
from resnet_jax import metrics as metrics_lib
from resnet_jax import models
from resnet_jax.parallel import AXIS

NO_NONFINITE_STEP = np.iinfo(np.int32).max


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any = None  # the weight EMA, {"params", "batch_stats"} (resnet_jax.ema); None: off, no leaves

    def ema_weights(self) -> "TrainState":
        """This state with the EMA as its params and BN statistics: what evaluation runs."""
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


def build_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> models.ResNet:
    """The model `config.model` describes (the trainer knows nothing of its insides)."""
    m = config.model
    return models.create(
        m.name, num_classes=config.data.num_classes, family=m.family or None, shortcut=m.shortcut,
        zero_init_residual=m.zero_init_residual, bottleneck_stride=m.bottleneck_stride, dtype=m.dtype,
        dropout_rate=m.dropout_rate, bn_axis_name=bn_axis_name, **config_lib.model_options(m),
    )


def create_train_state(model: models.ResNet, tx: optax.GradientTransformation, seed: int,
                       image_shape: tuple[int, ...], with_ema: bool = False) -> TrainState:
    """Fresh parameters (from `seed`), BN statistics and optimiser state; `with_ema`: and
    their weight EMA (a copy of them)."""
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                      ema_lib.initial(params, batch_stats) if with_ema else None)


def abstract_variables(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> dict:
    """Shapes and dtypes of {"params", "batch_stats"}, traced, not compiled or run."""
    variables = jax.eval_shape(lambda: build_model(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), train=False))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The loss, per example: softmax cross-entropy against integer labels. Every evaluation
    and the analyses use this one function, and training does unless its config says
    otherwise (`training_loss`): evaluation stays comparable across training losses, as in
    timm, whose validation loss is plain cross-entropy whatever the training loss."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def training_loss(logits: jax.Array, batch: dict, *, loss: str = "softmax", label_smoothing: float = 0.0,
                  bce_target_threshold: float = 0.0) -> jax.Array:
    """The training loss per example, as timm defines it ("ResNet strikes back").

    The targets are `batch["target"]` (soft labels from Mixup/CutMix, resnet_jax.data.mix)
    or one-hot `batch["label"]`, smoothed by `optax.smooth_labels` (timm's on/off values:
    1 - s + s/K and s/K). "softmax": cross-entropy against them (timm's
    SoftTargetCrossEntropy, or LabelSmoothingCrossEntropy without mixing). "sigmoid": one
    binary cross-entropy per class, averaged over the classes (timm's BinaryCrossEntropy,
    reduction "mean" over batch and classes), the targets first set to 1 where above
    `bce_target_threshold` and 0 elsewhere if it is > 0 (timm's `bce_target_thresh`).
    The defaults are `cross_entropy` on the integer labels itself, bit for bit.
    """
    if loss == "softmax" and not label_smoothing and "target" not in batch:
        return cross_entropy(logits, batch["label"])
    logits = logits.astype(jnp.float32)
    targets = batch["target"] if "target" in batch else jax.nn.one_hot(batch["label"], logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    if loss == "softmax":
        return optax.softmax_cross_entropy(logits, targets)
    if bce_target_threshold:
        targets = (targets > bce_target_threshold).astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)


def training_loss_of(config: ml_collections.ConfigDict):
    """`training_loss` with `config`'s choices: (logits, batch) -> loss per example."""
    return functools.partial(training_loss, loss=config.train.loss, label_smoothing=config.optim.label_smoothing,
                             bce_target_threshold=config.train.bce_target_threshold)


def describe_loss(config: ml_collections.ConfigDict) -> str | None:
    """The run's log line about a training loss other than plain cross-entropy (else None)."""
    train, smoothing = config.train, config.optim.label_smoothing
    if train.loss == "softmax" and not smoothing:
        return None
    name = "softmax cross-entropy" if train.loss == "softmax" else "sigmoid binary cross-entropy (mean over classes)"
    details = ([f"label smoothing {smoothing:g}"] if smoothing else []) + (
        [f"targets above {train.bce_target_threshold:g} set to 1, the rest to 0"] if train.bce_target_threshold else [])
    return (f"training loss: {name}" + (f", {', '.join(details)}" if details else "")
            + "; evaluations report softmax cross-entropy on the true labels")


def loss_and_grads(params: Any, batch_stats: Any, batch: dict, dropout_key: jax.Array, *, model,
                   depth_key: jax.Array | None = None, example_loss: Callable = training_loss):
    """The training forward pass (train-mode BN, dropout) and its gradients on `batch`.

    `depth_key` is stochastic depth's key, the same on every device (the trainer derives it
    from (seed, step)); None uses `dropout_key` (single-device callers). `example_loss(logits,
    batch)` is the loss per example (`training_loss_of(config)`; the default is
    `cross_entropy` on the integer labels).

    Returns:
      (mean loss, logits, updated BN statistics, gradients with respect to `params`).
    """

    def loss_fn(params):
        logits, updated = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key, "depth": dropout_key if depth_key is None else depth_key},
        )
        return example_loss(logits, batch).mean(), (logits, updated["batch_stats"])

    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, new_batch_stats, grads


def train_step(state: TrainState, batch: dict, dropout_key: jax.Array, *, model, tx, bn_sync: bool,
               axis_name: str | None = AXIS, depth_key: jax.Array | None = None,
               ema_step_size: Callable[[jax.Array], jax.Array] | None = None,
               example_loss: Callable = training_loss):
    """One SGD step on this device's part of the batch; gradients averaged over `axis_name`.

    With sync BN the model normalises over the global batch itself (its BN layers pmean
    their statistics); otherwise each device normalises alone, like the paper's per-GPU BN,
    and the running statistics are averaged here so every replica holds the same state.
    A state with a weight EMA moves it towards the new (replicated) weights by
    `ema_step_size(updates made)` (resnet_jax.ema).
    `example_loss`: see `loss_and_grads`. The error is against `batch["label"]`, which for a
    mixed batch is each example's dominant label (resnet_jax.data.mix).

    Returns:
      The new state, and the step's metrics over the global batch (`TRAIN_METRICS`, in that
      order): each is averaged over the steps between two logs (a new metric is one line
      here and its name in `TRAIN_METRICS`).
    """
    mean = (lambda x: x) if axis_name is None else (lambda x: jax.lax.pmean(x, axis_name))
    loss, logits, batch_stats, grads = loss_and_grads(state.params, state.batch_stats, batch, dropout_key,
                                                      model=model, depth_key=depth_key, example_loss=example_loss)
    grads = mean(grads)
    if not bn_sync:
        batch_stats = mean(batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": mean(loss),
        "error": 1.0 - mean(jnp.mean(jnp.argmax(logits, -1) == batch["label"])),
        "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
    }
    assert tuple(metrics) == TRAIN_METRICS, f"train_step's metrics {tuple(metrics)}: add them to TRAIN_METRICS"
    ema = state.ema if state.ema is None else ema_lib.update(state.ema, params, batch_stats,
                                                             ema_step_size(state.step + 1))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                         ema=ema), metrics


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
    """Sums over this device's part of the batch of loss and top-1/top-5 hits, padding
    masked out. The pipeline adds them up over batches and then over devices (one psum per
    evaluation rather than one per batch)."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"]
    return {
        "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "top1": jnp.sum(metrics_lib.topk_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(metrics_lib.topk_correct(logits, batch["label"], 5) * mask),
        "examples": jnp.sum(mask),
    }


# ---------------------------------------------------------------------------------------
# Metrics summed on the device between two fetches by the host.


# The scalars `train_step` returns. Named here so the trainer can make its accumulator without
# tracing a whole training step for their shapes (seconds for a ResNet-50).
TRAIN_METRICS = ("loss", "error", "grad_norm")


def zero_accumulator(names: tuple[str, ...] = TRAIN_METRICS) -> dict:
    """Zero sums of the scalar metrics `names`, on the host."""
    return {"sums": {name: np.float32(0) for name in names}, "steps": np.float32(0),
            "first_nonfinite_step": np.int32(NO_NONFINITE_STEP)}


def accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds one step's metrics; remembers the first step whose metrics were not finite."""
    finite = jnp.all(jnp.stack([jnp.isfinite(m) for m in jax.tree.leaves(metrics)]))
    return {"sums": jax.tree.map(jnp.add, acc["sums"], metrics), "steps": acc["steps"] + 1,
            "first_nonfinite_step": jnp.where(finite, acc["first_nonfinite_step"],
                                              jnp.minimum(acc["first_nonfinite_step"], step))}
