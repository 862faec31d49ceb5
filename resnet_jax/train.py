"""TrainState, the per-device train and eval steps, and `train_and_evaluate`.

`train_step` and `eval_step` are written for one device with collectives over the "data"
axis; the data pipeline (resnet_jax.data.pipeline) maps them over every device and feeds
them. The loop below dispatches chunks of steps that end exactly where something must happen
on the host (a log, an evaluation, a checkpoint), at absolute step numbers, so a resumed run
replays the same chunks and ends bit for bit where an uninterrupted one would.
"""

import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax import config as config_lib
from resnet_jax import metrics as metrics_lib
from resnet_jax import models, optim
from resnet_jax import workdir as workdir_lib
from resnet_jax.checkpoint import Checkpoints, abstract_like
from resnet_jax.data import pipeline
from resnet_jax.errors import UserError
from resnet_jax.parallel import AXIS, Parallel
from resnet_jax.reporting import Reporter

NO_NONFINITE_STEP = np.iinfo(np.int32).max


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


class Preempted(Exception):
    """SIGTERM/SIGINT: a checkpoint was written; the same command resumes."""


class NonFinite(Exception):
    """The loss or gradient became NaN/inf; the last good checkpoint is untouched."""


def build_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> models.ResNet:
    """The model `config.model` describes (the trainer knows nothing of its insides)."""
    m = config.model
    return models.create(
        m.name, num_classes=config.data.num_classes, family=m.family or None, shortcut=m.shortcut,
        zero_init_residual=m.zero_init_residual, bottleneck_stride=m.bottleneck_stride, dtype=m.dtype,
        dropout_rate=m.dropout_rate, bn_axis_name=bn_axis_name,
    )


def create_train_state(model: models.ResNet, tx: optax.GradientTransformation, seed: int,
                       image_shape: tuple[int, ...]) -> TrainState:
    """Fresh parameters (from `seed`), BN statistics and optimiser state."""
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], tx.init(params))


def abstract_variables(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> dict:
    """Shapes and dtypes of {"params", "batch_stats"}, traced, not compiled or run."""
    variables = jax.eval_shape(lambda: build_model(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), train=False))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------------------------------
# Per-device steps.


def train_step(state: TrainState, batch: dict, dropout_key: jax.Array, *, model, tx, bn_sync: bool):
    """One SGD step on this device's part of the batch; gradients averaged over "data".

    With sync BN the model normalises over the global batch itself (its BN layers pmean
    their statistics); otherwise each device normalises alone, like the paper's per-GPU BN,
    and the running statistics are averaged here so every replica holds the same state.

    Returns:
      The new state, and the step's metrics over the global batch: a dict whose every entry
      is averaged over the steps between two logs (a new metric is one line here).
    """

    def loss_fn(params):
        logits, updated = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key},
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, updated["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    if not bn_sync:
        batch_stats = jax.lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": jax.lax.pmean(loss, AXIS),
        "error": 1.0 - jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == batch["label"]), AXIS),
        "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
    }
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
    """Sums over this device's part of the batch of loss and top-1/top-5 hits, padding
    masked out. The pipeline adds them up over batches and then over devices (one psum per
    evaluation rather than one per batch)."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sums = {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(metrics_lib.topk_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(metrics_lib.topk_correct(logits, batch["label"], 5) * mask),
        "examples": jnp.sum(mask),
    }
    return sums


def zero_accumulator(metrics: dict) -> dict:
    """Device-side sums of `metrics` (names -> scalars) between two fetches by the host."""
    return {"sums": jax.tree.map(lambda _: np.float32(0), metrics), "steps": np.float32(0),
            "first_nonfinite_step": np.int32(NO_NONFINITE_STEP)}


def accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds one step's metrics; remembers the first step whose metrics were not finite."""
    finite = jnp.all(jnp.stack([jnp.isfinite(m) for m in jax.tree.leaves(metrics)]))
    return {"sums": jax.tree.map(jnp.add, acc["sums"], metrics), "steps": acc["steps"] + 1,
            "first_nonfinite_step": jnp.where(finite, acc["first_nonfinite_step"],
                                              jnp.minimum(acc["first_nonfinite_step"], step))}


# ---------------------------------------------------------------------------------------
# The run.


class Trainer:
    """What `train_and_evaluate` sets up once: data, model, optimiser, the mapped steps."""

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel):
        self.config, self.parallel = config, parallel
        # Data first: a bad split, file or array fails before anything is compiled or written.
        self.data = pipeline.create(config, parallel)
        self.image_shape = self.data.image_shape
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = config_lib.validate_lengths(config, self.steps_per_epoch)
        self.schedule = optim.make_schedule(config.optim, self.steps_per_epoch, self.total_steps)
        self.tx = optim.make_optimizer(config.optim, self.schedule)
        self.model = build_model(config, AXIS if config.model.bn_sync else None)
        self.eval_model = build_model(config)
        # Chunks of steps_per_dispatch steps, capped at an epoch (a chunk crosses at most one
        # epoch boundary; see DevicePipeline).
        self.steps_per_dispatch = min(
            config_lib.steps_per_dispatch(config.train.steps_per_dispatch, jax.devices()[0].platform),
            self.steps_per_epoch)
        self.data.bind(self.step_and_accumulate, self.evaluate_step)
        self.stream_step = parallel.wrap(self.step_and_accumulate, (None, 0, None), (None, None),
                                         donate_argnums=(0, 2))

    def step_and_accumulate(self, state: TrainState, batch: dict, acc: dict):
        """The per-device step the pipelines run: keys from (seed, step), metrics summed."""
        _, dropout_key = pipeline.step_keys(self.config.train.seed, state.step)
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(AXIS))
        new_state, metrics = train_step(state, batch, dropout_key, model=self.model, tx=self.tx,
                                        bn_sync=self.config.model.bn_sync)
        return new_state, accumulate(acc, metrics, state.step)

    def evaluate_step(self, state: TrainState, batch: dict) -> dict:
        return eval_step(state, batch, model=self.eval_model)

    @functools.cached_property
    def _abstract_state(self) -> TrainState:
        return jax.eval_shape(lambda: create_train_state(self.eval_model, self.tx, self.config.train.seed,
                                                         tuple(self.image_shape)))

    def abstract_state(self) -> TrainState:
        """The layout of `init_state()`, traced (once), not compiled."""
        return self._abstract_state

    def init_state(self) -> TrainState:
        init = jax.jit(create_train_state, static_argnums=(0, 1, 2, 3))
        state = init(self.eval_model, self.tx, self.config.train.seed, tuple(self.image_shape))
        return self.parallel.replicate(jax.device_get(state))

    @functools.cached_property
    def _metric_shapes(self) -> dict:
        """The metrics `train_step` returns, traced once (not at every log)."""
        per_device = self.config.train.batch_size // self.parallel.num_devices
        batch = {"image": jax.ShapeDtypeStruct((1, per_device, *self.image_shape), jnp.float32),
                 "label": jax.ShapeDtypeStruct((1, per_device), jnp.int32)}
        step = lambda state, b: train_step(state, b, jax.random.PRNGKey(0), model=self.eval_model, tx=self.tx,
                                           bn_sync=True)[1]
        return jax.eval_shape(jax.vmap(step, in_axes=(None, 0), axis_name=AXIS), self.abstract_state(), batch)

    def zero_accumulator(self):
        """Zero sums of the metrics `train_step` returns, on the devices."""
        return self.parallel.replicate(zero_accumulator(self._metric_shapes))

    def chunk_length(self, step: int, next_event: int) -> int:
        """Whole chunks, then single steps up to the next event: two compiled variants."""
        return self.steps_per_dispatch if next_event - step >= self.steps_per_dispatch else 1


def _is_time(step: int, every: int, total: int) -> bool:
    """big_vision's `itstime`: every `every` steps, and at the end."""
    return step == total or (every > 0 and step % every == 0)


def _next_event(step: int, total: int, *periods: int) -> int:
    """The first step after `step` at which the host has something to do."""
    return min([total] + [(step // p + 1) * p for p in periods if p > 0])


def _restore_or_init(trainer: Trainer, checkpoints: Checkpoints) -> tuple[TrainState, dict, bool, list[str]]:
    """The latest good checkpoint, or a fresh state (from `train.init_from` if set); the
    run's bookkeeping; whether a checkpoint was restored; and lines worth telling the user."""
    parallel = trainer.parallel
    meta = {"best_error": None, "best_step": None, "evals_since_best": 0, "stopped_early": None,
            "data_state": None}
    restored = checkpoints.restore(abstract_like(trainer.abstract_state(), parallel.replicated))
    if restored:
        global_state, saved_meta, _ = restored
        return parallel.from_global(global_state), {**meta, **saved_meta}, True, []
    state, notes = trainer.init_state(), []
    if trainer.config.train.init_from:
        from resnet_jax import convert  # fine-tuning only

        host = parallel.unreplicate(state)
        params, batch_stats, loaded, fresh = convert.load_initial_weights(
            trainer.config.train.init_from, host.params, host.batch_stats)
        notes.append(f"initialised from {trainer.config.train.init_from}: {len(loaded)} arrays loaded, "
                     f"{len(fresh)} fresh" + (f" ({', '.join(fresh)})" if fresh else ""))
        state = parallel.replicate(host.replace(params=params, batch_stats=batch_stats))
    return state, meta, False, notes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Returns:
      The final evaluation: {split: {"loss", "error", "top5_error", "examples"}}, plus
      "step" and "best" ({"step", "error"}).

    Raises:
      UserError: bad config, data or workdir (nothing was compiled or written).
      Preempted: a signal stopped the run after writing a checkpoint.
      NonFinite: the loss became NaN/inf; the last good checkpoint is untouched.
    """
    parallel = Parallel(config.parallel.backend)
    config_lib.validate(config, parallel.num_devices)
    trainer = Trainer(config, parallel)
    data, train_cfg, total = trainer.data, config.train, trainer.total_steps
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()))
    lock = workdir_lib.prepare(config, workdir, state_bytes)
    needed = workdir_lib.space_needed(config, state_bytes)
    checkpoints = reporter = None
    try:
        checkpoints = Checkpoints(workdir, train_cfg.keep_checkpoints, needed)
        state, meta, restored, notes = _restore_or_init(trainer, checkpoints)
        data.set_state(meta["data_state"])
        step = int(parallel.unreplicate(state.step))
        meta["normalization"] = {"mean": np.asarray(data.normalization[0]).tolist(),
                                 "std": np.asarray(data.normalization[1]).tolist()}
        meta["image_shape"] = list(trainer.image_shape)

        reporter = Reporter(workdir, total, step, train_cfg.progress, needed)
        reporter.print(f"{config.model.name} on {config.data.name} ({config.data.source}), {parallel.describe()}, "
                       f"global batch {train_cfg.batch_size}, {trainer.steps_per_epoch} steps/epoch, "
                       + (f"resuming at step {step}" if restored else
                          f"from {config.train.init_from}" if config.train.init_from else "from scratch"))
        reporter.started(workdir, checkpoints.directory)
        for line in notes:
            reporter.print(line)
        # Weights not trained here (imported, or fine-tuning's start) are evaluated first.
        evaluate_first = step == 0 and (restored or bool(config.train.init_from)) and meta["best_step"] is None
        final = _loop(trainer, state, meta, step, checkpoints, reporter, evaluate_first)
    except BaseException:
        _release(reporter, checkpoints, data, lock, quiet=True)  # the error on its way out is the one to tell
        raise
    _release(reporter, checkpoints, data, lock, quiet=False)

    minutes = (time.time() - reporter.start_time) / 60
    parts = [f"{name} error {100 * r['error']:.2f}% (top-5 {100 * r['top5_error']:.2f}%, {r['examples']} images)"
             for name, r in final["results"].items()]
    best = {"step": meta["best_step"], "error": meta["best_error"]}
    if jax.process_index() == 0:
        print(f"done: {config.model.name} on {config.data.name}, step {final['step']}, {minutes:.1f} min: "
              + ", ".join(parts)
              + (f"; best {100 * best['error']:.2f}% at step {best['step']}" if best["error"] is not None else "")
              + (f"; stopped early at step {meta['stopped_early']}" if meta["stopped_early"] else ""), flush=True)
    return {**final["results"], "step": final["step"], "best": best}


def _release(reporter: Reporter | None, checkpoints: Checkpoints | None, data, lock, quiet: bool) -> None:
    """Closes the writers and releases the lock, every one even when another fails (a full
    disk fails them all). `quiet`: an error is already on its way out, and a second one from
    here must not replace it; otherwise the first failure is raised once all are done."""
    closers = ([lambda: reporter.close(quiet)] if reporter is not None else []) + (
        [checkpoints.close] if checkpoints is not None else []) + [data.close, lock.release]
    failed = None
    for close in closers:
        try:
            close()
        except Exception as error:  # noqa: BLE001 -- each closer must run; the first failure is kept
            failed = failed or error
    if failed is not None and not quiet:
        raise failed


def _loop(trainer: Trainer, state: TrainState, meta: dict, step: int, checkpoints: Checkpoints,
          reporter: Reporter, evaluate_first: bool) -> dict:
    """Chunks of steps until the end (or an early stop); logs, evaluates and checkpoints
    when it is time. `evaluate_first`: evaluate before the first step too (imported or
    fine-tuned weights: the first logged error is theirs). Returns {"results", "step"}."""
    config, parallel, data, total = trainer.config, trainer.parallel, trainer.data, trainer.total_steps
    train_cfg = config.train
    eval_every = train_cfg.eval_every or trainer.steps_per_epoch
    watched = train_cfg.early_stopping_split or next(iter(data.eval_splits), None)
    periods = (train_cfg.log_every, eval_every, train_cfg.checkpoint_every)
    acc = trainer.zero_accumulator()
    results = {}
    window_start, window_step, paused_s = time.time(), step, 0.0

    def evaluate(step: int) -> tuple[float, bool]:
        """Evaluates every split, tracks the best and the patience; (error, new best?)."""
        nonlocal results
        results = data.evaluate(state)
        error = results[watched]["error"]
        new_best = meta["best_error"] is None or error < meta["best_error"]
        if new_best:
            meta.update(best_error=error, best_step=step, evals_since_best=0)
        else:
            meta["evals_since_best"] += 1
        reporter.evaluated(step, results, meta["best_step"], meta["best_error"], watched)
        patience = train_cfg.early_stopping_patience
        if patience and meta["evals_since_best"] >= patience:
            meta["stopped_early"] = step
            reporter.print(f"early stopping at step {step}: no better {watched} error in {patience} evaluations")
        return error, new_best

    def save(step: int, error: float | None) -> None:
        meta["data_state"] = data.get_state()
        checkpoints.save(step, parallel.to_global(state), dict(meta, step=step), error)

    if evaluate_first and step < total and watched is not None:
        error, new_best = evaluate(step)
        if new_best and step not in checkpoints.steps():  # an imported run has its step 0 already
            save(step, error)
    with workdir_lib.SignalFlag() as interrupt:
        while step < total and not meta["stopped_early"]:
            num_steps = trainer.chunk_length(step, _next_event(step, total, *periods))
            state, acc = data.train(state, acc, num_steps, step)
            step += num_steps
            reporter.advance_to(step)
            is_log, is_eval, is_checkpoint = (_is_time(step, every, total) for every in periods)
            is_eval = is_eval and watched is not None  # data.eval_splits may name none
            if not (is_log or is_eval or is_checkpoint or interrupt.signal):
                continue
            sums = parallel.unreplicate(acc)  # the only host synchronisation
            if sums["first_nonfinite_step"] != NO_NONFINITE_STEP:
                raise NonFinite(f"non-finite loss or gradient at step {int(sums['first_nonfinite_step'])}; "
                                f"stopped, checkpoints in {checkpoints.directory} are untouched "
                                "(lower optim.lr or check the data)")
            if is_log and sums["steps"]:
                elapsed = time.time() - window_start - paused_s
                reporter.write({"step": step, "split": "train",
                                **{k: v / sums["steps"] for k, v in sums["sums"].items()},
                                "lr": float(trainer.schedule(step - 1)),
                                "images_per_sec": (step - window_step) * train_cfg.batch_size / max(elapsed, 1e-9)})
                acc = trainer.zero_accumulator()
                window_start, window_step, paused_s = time.time(), step, 0.0
            busy_since = time.time()
            error, new_best = evaluate(step) if is_eval else (None, False)
            # Checkpoints at their cadence, at the end, when stopping, and when an evaluation
            # sets a new best (so the best one always exists to evaluate later).
            if is_checkpoint or new_best or meta["stopped_early"] or interrupt.signal:
                save(step, error)
            paused_s += time.time() - busy_since  # images/s counts training time only
            if interrupt.signal:
                raise Preempted(f"{interrupt.signal} at step {step}: checkpoint saved in "
                                f"{checkpoints.directory}; run the same command again to resume")
    if not results and watched is not None:  # resumed a finished run: evaluate what is there
        results = data.evaluate(state)
    return {"results": results, "step": step}
