"""TrainState, the per-device train and eval steps, and `train_and_evaluate`.

`train_step` and `eval_step` are written for one device with collectives over the "data"
axis; `parallel.Parallel` maps them over every device with shard_map or pmap. The host loop
dispatches chunks of steps that end exactly where something must happen on the host (a
log, an evaluation, a checkpoint, a new epoch), so a resumed run replays the same chunks.
"""

import functools
import json
import os
import shutil
import signal
import sys
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
from resnet_jax.checkpoint import Checkpoints, abstract_like
from resnet_jax.data import device as device_data
from resnet_jax.data import sources
from resnet_jax.errors import UserError
from resnet_jax.parallel import AXIS, Parallel
from resnet_jax.reporting import Reporter

# Fields that define what a run *is*: resuming with any of them changed would mix two runs.
IDENTITY_FIELDS = ("model", "data.source", "data.name", "data.path", "data.image_size",
                   "data.num_classes", "data.train_split", "train.batch_size", "train.seed")


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


# ---------------------------------------------------------------------------------------
# Per-device steps.


def train_step(state: TrainState, batch: dict, dropout_key: jax.Array, *, model, tx, bn_sync: bool):
    """One SGD step on this device's part of the batch; gradients averaged over "data".

    With sync BN the model normalises over the global batch itself (its BN layers pmean
    their statistics); otherwise each device normalises alone, like the paper's per-GPU BN,
    and the running statistics are averaged here so every replica holds the same state.
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
        "correct": jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) == batch["label"]), AXIS).astype(jnp.float32),
        "examples": jax.lax.psum(batch["label"].shape[0], AXIS) * 1.0,
        "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
    }
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
    """Sums over the global batch of loss and top-1/top-5 hits, padding masked out."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sums = {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(metrics_lib.topk_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(metrics_lib.topk_correct(logits, batch["label"], 5) * mask),
        "examples": jnp.sum(mask),
    }
    return jax.lax.psum(sums, AXIS)


def zero_accumulator() -> dict:
    """Device-side sums of training metrics between two fetches by the host."""
    zero = jnp.zeros((), jnp.float32)
    return {"loss": zero, "correct": zero, "examples": zero, "grad_norm": zero, "steps": zero,
            "first_nonfinite_step": jnp.full((), np.iinfo(np.int32).max, jnp.int32)}


def accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return {
        "loss": acc["loss"] + metrics["loss"],
        "correct": acc["correct"] + metrics["correct"],
        "examples": acc["examples"] + metrics["examples"],
        "grad_norm": acc["grad_norm"] + metrics["grad_norm"],
        "steps": acc["steps"] + 1,
        "first_nonfinite_step": jnp.where(finite, acc["first_nonfinite_step"],
                                          jnp.minimum(acc["first_nonfinite_step"], step)),
    }


# ---------------------------------------------------------------------------------------
# The run.


class Trainer:
    """Everything `train_and_evaluate` sets up once: model, optimiser, data, mapped steps."""

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel):
        self.config, self.parallel = config, parallel
        data, train = config.data, config.train
        self.per_device_batch = train.batch_size // parallel.num_devices
        self.per_device_eval_batch = train.eval_batch_size // parallel.num_devices
        self.eval_splits = config_lib.parse_splits(data.eval_splits)

        # Data first: a bad split or file must fail before anything is compiled or written.
        if data.pipeline == "device":
            train_arrays = sources.load_split(data, data.train_split)
            self.num_train = len(train_arrays.labels)
            stats = device_data.normalization_stats(data, train_arrays)
            self.image_shape = train_arrays.images.shape[1:]
            self.host_eval = {
                name: device_data.host_data(sources.load_split(data, split), stats, train.eval_batch_size)
                for name, split in self.eval_splits.items()
            }
            self.host_train = device_data.host_data(train_arrays, stats)
        else:
            from resnet_jax.data import stream

            self.stream = stream
            sources.prepare_tfds(data.name, data.data_dir)
            self.num_train = stream.num_examples(data.name, data.train_split, data.data_dir)
            self.image_shape = (data.image_size, data.image_size, 3)
        self.steps_per_epoch = self.num_train // train.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={train.batch_size} is larger than the {self.num_train} "
                            f"training examples of {data.train_split!r}")

        self.schedule = optim.make_schedule(config.optim, self.steps_per_epoch, train.total_steps)
        self.tx = optim.make_optimizer(config.optim, self.schedule)
        self.model = build_model(config, AXIS if config.model.bn_sync else None)
        self.eval_model = build_model(config)
        self._chunks = {}
        self._permutations = {}
        # Chunks of steps_per_dispatch steps, capped at an epoch (see `device_chunk`).
        self.steps_per_dispatch = min(train.steps_per_dispatch, self.steps_per_epoch)

    # -- mapped steps ----------------------------------------------------------------
    def _train_kwargs(self):
        return dict(model=self.model, tx=self.tx, bn_sync=self.config.model.bn_sync)

    def _keys(self, step):
        """Augmentation and dropout keys of `step`: fold_in(seed, step), nothing else."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.train.seed), step)
        augment_key, dropout_key = jax.random.split(key)
        return augment_key, jax.random.fold_in(dropout_key, jax.lax.axis_index(AXIS))

    def device_chunk(self, num_steps: int):
        """`num_steps` steps on device-resident data, in one dispatch.

        It takes the permutations of two epochs, [2, N], starting at `first_epoch`, so a
        chunk (at most an epoch long) may cross one epoch boundary.
        """
        if num_steps not in self._chunks:
            data = self.config.data

            def chunk(state, acc, train_data, permutations, first_epoch):
                def one_step(carry, _):
                    state, acc = carry
                    augment_key, dropout_key = self._keys(state.step)
                    permutation = permutations[state.step // self.steps_per_epoch - first_epoch]
                    batch = device_data.train_batch(
                        train_data, permutation, state.step, self.steps_per_epoch, self.per_device_batch,
                        jax.lax.axis_index(AXIS), augment_key, data.crop_padding, data.flip,
                    )
                    new_state, metrics = train_step(state, batch, dropout_key, **self._train_kwargs())
                    return (new_state, accumulate(acc, metrics, state.step)), None

                if num_steps == 1:
                    # Not a scan of length 1: XLA:CPU runs the kernel-gradient convolutions
                    # ~20x slower inside a loop body (ResNet-20, batch 32: 0.26 s a step
                    # dispatched alone, 5.3 s as a one-step scan).
                    (state, acc), _ = one_step((state, acc), None)
                    return state, acc
                (state, acc), _ = jax.lax.scan(one_step, (state, acc), None, length=num_steps)
                return state, acc

            self._chunks[num_steps] = self.parallel.wrap(chunk, (None, None, None, None, None), (None, None),
                                                          donate_argnums=(0, 1))
        return self._chunks[num_steps]

    @functools.cached_property
    def stream_step(self):
        def step(state, acc, batch):
            _, dropout_key = self._keys(state.step)
            new_state, metrics = train_step(state, batch, dropout_key, **self._train_kwargs())
            return new_state, accumulate(acc, metrics, state.step)

        return self.parallel.wrap(step, (None, None, 0), (None, None), donate_argnums=(0, 1))

    @functools.cached_property
    def device_eval(self):
        def evaluate(state, eval_data):
            num_batches = eval_data.labels.shape[0] // self.config.train.eval_batch_size
            device_index = jax.lax.axis_index(AXIS)

            def body(i, sums):
                batch = device_data.eval_batch(eval_data, i, self.per_device_eval_batch, device_index)
                return jax.tree.map(jnp.add, sums, eval_step(state, batch, model=self.eval_model))

            zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "examples")}
            return jax.lax.fori_loop(0, num_batches, body, zeros)

        return self.parallel.wrap(evaluate, (None, None), None)

    @functools.cached_property
    def stream_eval(self):
        return self.parallel.wrap(functools.partial(eval_step, model=self.eval_model), (None, 0), None)

    def permutations(self, epoch: int):
        """The data orders of `epoch` and the next, replicated (computed once an epoch)."""
        if epoch not in self._permutations:
            order = jax.jit(device_data.epoch_permutation, static_argnums=(2,))
            two = [np.asarray(order(self.config.train.seed, e, self.num_train)) for e in (epoch, epoch + 1)]
            self._permutations = {epoch: self.parallel.replicate((np.stack(two), np.int32(epoch)))}
        return self._permutations[epoch]

    # -- host side -------------------------------------------------------------------
    def init_state(self) -> TrainState:
        init = jax.jit(create_train_state, static_argnums=(0, 1, 2, 3))
        state = init(self.eval_model, self.tx, self.config.train.seed, tuple(self.image_shape))
        return self.parallel.replicate(jax.device_get(state))

    def evaluate(self, state, eval_data: dict) -> dict[str, dict]:
        """Exact evaluation of every split: each example counted once."""
        results = {}
        for name in self.eval_splits:
            if self.config.data.pipeline == "device":
                sums = self.parallel.unreplicate(self.device_eval(state, eval_data[name]))
            else:
                sums = None
                for batch in self._eval_stream(name):
                    out = self.parallel.unreplicate(self.stream_eval(state, self.parallel.shard(batch)))
                    sums = out if sums is None else jax.tree.map(np.add, sums, out)
            n = sums["examples"]
            results[name] = {"loss": float(sums["loss"] / n), "error": float(1 - sums["top1"] / n),
                             "top5_error": float(1 - sums["top5"] / n), "examples": int(n)}
        return results

    def _eval_stream(self, name):
        return self.stream.make_stream(
            self.config, self.eval_splits[name], train=False, global_batch_size=self.config.train.eval_batch_size,
            seed=self.config.train.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        )

    def train_stream(self):
        return self.stream.make_stream(
            self.config, self.config.data.train_split, train=True, global_batch_size=self.config.train.batch_size,
            seed=self.config.train.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        )


def _flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _identity(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in IDENTITY_FIELDS)}


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, state_bytes: int) -> None:
    """Creates the workdir, refuses a different run in it, checks it is writable with room
    for the checkpoints, and writes config.json. Raises UserError."""
    config_path = os.path.join(workdir, "config.json")
    new = _flatten(config)
    if os.path.exists(config_path) and not config.overwrite:
        with open(config_path) as f:
            old = json.load(f)
        differ = {k: (old.get(k), new.get(k)) for k in _identity(old) | _identity(new) if old.get(k) != new.get(k)}
        if differ:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(differ.items()))
            raise UserError(f"{workdir} holds a different run ({shown}); use a new workdir or "
                            "--config.overwrite=True to start over")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise UserError(f"workdir {workdir} is not writable: {error.strerror or error}") from None
    needed = state_bytes * (config.train.keep_checkpoints + 2)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise UserError(f"not enough disk space in {workdir}: {free / 2**20:.0f} MiB free, checkpoints need "
                        f"about {needed / 2**20:.0f} MiB")
    if config.overwrite:
        for name in ("checkpoints", "corrupt_checkpoints", "tensorboard", "report"):
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            os.remove(os.path.join(workdir, "metrics.jsonl"))
    if jax.process_index() == 0:
        with open(config_path, "w") as f:
            json.dump(new, f, indent=2, sort_keys=True)


class _SignalFlag:
    """The first SIGTERM/SIGINT asks for a checkpoint and a clean stop; the second exits at
    once (Orbax's atomic renames keep the last complete checkpoint intact)."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing the current step and writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _next_stop(step: int, total: int, *periods: int) -> int:
    """The first step after `step` at which the host has something to do."""
    return min([total] + [(step // p + 1) * p for p in periods if p > 0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Returns:
      The final evaluation: {split: {"loss", "error", "top5_error", "examples"}}, plus
      "step" and "best" ({"step", "error"}).

    Raises:
      UserError: bad config, data or workdir (nothing was written).
      Preempted: a signal stopped the run after writing a checkpoint.
      NonFinite: the loss became NaN/inf; the last good checkpoint is untouched.
    """
    parallel = Parallel(config.parallel.backend)
    config_lib.validate(config, parallel.num_devices)
    trainer = Trainer(config, parallel)
    train_cfg = config.train

    state = trainer.init_state()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(parallel.unreplicate(state)))
    prepare_workdir(config, workdir, state_bytes)
    checkpoints = Checkpoints(workdir, train_cfg.keep_checkpoints)
    meta = {"best_error": None, "best_step": None, "evals_since_best": 0, "data_state": None}
    try:
        restored = checkpoints.restore(abstract_like(parallel.to_global(state), parallel.replicated))
    except UserError:
        checkpoints.close()  # stop Orbax's threads before the one-line exit
        raise
    if restored:
        global_state, meta, _ = restored
        state = parallel.from_global(global_state)
    step = int(parallel.unreplicate(state.step))

    eval_every = train_cfg.eval_every or trainer.steps_per_epoch
    reporter = Reporter(workdir, train_cfg.total_steps, step, train_cfg.progress)
    reporter.print(f"{config.model.name} on {config.data.name} ({config.data.source}), "
                   f"{parallel.describe()}, global batch {train_cfg.batch_size}, "
                   f"{trainer.steps_per_epoch} steps/epoch, {'resuming at step ' + str(step) if step else 'from scratch'}")

    if config.data.pipeline == "device":
        train_data = parallel.replicate(trainer.host_train)
        eval_data = {name: parallel.replicate(d) for name, d in trainer.host_eval.items()}
        stream_it = None
    else:
        train_data = eval_data = None
        stream_it = trainer.train_stream()
        if meta.get("data_state"):
            stream_it.set_state(meta["data_state"])

    def save(step, error=None):
        if stream_it is not None:
            meta["data_state"] = stream_it.get_state()
        checkpoints.save(step, parallel.to_global(state), dict(meta, step=step), error)

    acc = parallel.replicate(jax.device_get(zero_accumulator()))
    window_start, window_step = time.time(), step
    final = {}
    try:
        with _SignalFlag() as interrupt:
            while step < train_cfg.total_steps:
                stop = _next_stop(step, train_cfg.total_steps, train_cfg.log_every, eval_every,
                                  train_cfg.checkpoint_every)
                while step < stop:
                    if stream_it is None:
                        # Whole chunks, then single steps up to the stop: two compiled variants.
                        n = trainer.steps_per_dispatch if stop - step >= trainer.steps_per_dispatch else 1
                        permutations, first_epoch = trainer.permutations(step // trainer.steps_per_epoch)
                        state, acc = trainer.device_chunk(n)(state, acc, train_data, permutations, first_epoch)
                    else:
                        n = 1
                        state, acc = trainer.stream_step(state, acc, parallel.shard(next(stream_it)))
                    step += n
                    reporter.advance_to(step)
                    if interrupt.signal:
                        break

                is_log = step % train_cfg.log_every == 0 or step == train_cfg.total_steps
                is_eval = step % eval_every == 0 or step == train_cfg.total_steps
                is_checkpoint = step % train_cfg.checkpoint_every == 0 or step == train_cfg.total_steps
                if not (is_log or is_eval or is_checkpoint or interrupt.signal):
                    continue
                sums = parallel.unreplicate(acc)  # the only host synchronisation
                if sums["first_nonfinite_step"] < np.iinfo(np.int32).max:
                    raise NonFinite(f"non-finite loss or gradient at step {int(sums['first_nonfinite_step'])}; "
                                    f"stopped, checkpoints in {checkpoints.directory} are untouched "
                                    "(lower optim.lr or check the data)")
                if is_log and sums["steps"]:
                    elapsed = time.time() - window_start
                    reporter.write({
                        "step": step, "split": "train", "loss": sums["loss"] / sums["steps"],
                        "error": 1 - sums["correct"] / sums["examples"],
                        "lr": float(trainer.schedule(step - 1)), "grad_norm": sums["grad_norm"] / sums["steps"],
                        "images_per_sec": (step - window_step) * train_cfg.batch_size / max(elapsed, 1e-9),
                    })
                    acc = parallel.replicate(jax.device_get(zero_accumulator()))
                    window_start, window_step = time.time(), step
                error = None
                if is_eval:
                    final = trainer.evaluate(state, eval_data)
                    for name, result in final.items():
                        reporter.write({"step": step, "split": name, **{k: v for k, v in result.items() if k != "examples"}})
                    watched = train_cfg.early_stopping_split or next(iter(final))
                    error = final[watched]["error"]
                    if meta["best_error"] is None or error < meta["best_error"]:
                        meta.update(best_error=error, best_step=step, evals_since_best=0)
                    else:
                        meta["evals_since_best"] += 1
                if is_checkpoint or is_eval or interrupt.signal:
                    save(step, error)
                if interrupt.signal:
                    raise Preempted(f"{interrupt.signal} at step {step}: checkpoint saved in "
                                    f"{checkpoints.directory}; run the same command again to resume")
                patience = train_cfg.early_stopping_patience
                if patience and meta["evals_since_best"] >= patience:
                    reporter.print(f"early stopping at step {step}: no better {watched} error in {patience} evaluations")
                    break
        if not final:  # resumed a finished run: evaluate what is there
            final = trainer.evaluate(state, eval_data)
    finally:
        reporter.close()
        checkpoints.close()

    minutes = (time.time() - reporter.start_time) / 60
    parts = [f"{name} error {100 * r['error']:.2f}% (top-5 {100 * r['top5_error']:.2f}%, {r['examples']} images)"
             for name, r in final.items()]
    best = {"step": meta["best_step"], "error": meta["best_error"]}
    if jax.process_index() == 0:
        print(f"done: {config.model.name} on {config.data.name}, step {step}, {minutes:.1f} min: " + ", ".join(parts)
              + (f"; best {100 * best['error']:.2f}% at step {best['step']}" if best["error"] is not None else ""),
              flush=True)
    return {**final, "step": step, "best": best}
