"""`train_and_evaluate`: a config trained (or resumed) in a workdir.

The steps themselves are in resnet_jax.steps; the data pipeline (resnet_jax.data.pipeline)
maps them over every device and feeds them. The loop below dispatches chunks of steps that
end exactly where something must happen on the host (a log, an evaluation, a checkpoint),
at absolute step numbers, so a resumed run replays the same chunks and ends bit for bit
where an uninterrupted one would.
"""

import functools
import time

import jax
import ml_collections
import numpy as np

from resnet_jax import config as config_lib
from resnet_jax import ema as ema_lib
from resnet_jax import optim, restore, rundir, steps
from resnet_jax.checkpoint import Checkpoints, abstract_like
from resnet_jax.data import mix, pipeline
from resnet_jax.errors import NonFinite, Preempted  # raised here: callers may catch them as train.X
from resnet_jax.parallel import AXIS, Parallel
from resnet_jax.reporting import Reporter
from resnet_jax.steps import TrainState, build_model, create_train_state

DEPTH_STREAM = 2**31 - 1  # folded into a step's dropout key for stochastic depth; never a device index
MIX_STREAM = 2**31 - 2  # ... and for Mixup/CutMix (the same on every device); never a device index

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
        self.with_ema = ema_lib.enabled(config.train)
        self.ema_step_size = ema_lib.step_size_schedule(config.train) if self.with_ema else None
        self.model = build_model(config, AXIS if config.model.bn_sync else None)
        self.eval_model = build_model(config)
        self.example_loss = steps.training_loss_of(config)
        # Chunks of steps_per_dispatch steps, capped at an epoch (a chunk crosses at most one
        # epoch boundary; see DevicePipeline).
        self.steps_per_dispatch = min(
            config_lib.steps_per_dispatch(config.train.steps_per_dispatch, jax.devices()[0].platform),
            self.steps_per_epoch)
        self.data.bind(self.step_and_accumulate, self.evaluate_step)
        # One step on a batch the caller gives (already sharded), mapped over the devices:
        # for probes and benchmarks; training itself goes through `data.train`.
        self.train_on_batch = parallel.wrap(self.step_and_accumulate, (None, 0, None), (None, None),
                                            donate_argnums=(0, 2))

    def step_and_accumulate(self, state: TrainState, batch: dict, acc: dict):
        """The per-device step the pipelines run: keys from (seed, step), metrics summed."""
        _, dropout_key = pipeline.step_keys(self.config.train.seed, state.step)
        # Stochastic depth drops a block for the global batch, and mixing draws one lambda and box
        # for it: their keys are the same on every device.
        depth_key = jax.random.fold_in(dropout_key, DEPTH_STREAM)
        if config_lib.mixing_enabled(self.config.data):
            batch = mix.mix_batch(batch, jax.random.fold_in(dropout_key, MIX_STREAM), self.config.data,
                                  self.config.data.num_classes)
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(AXIS))
        new_state, metrics = steps.train_step(state, batch, dropout_key, model=self.model, tx=self.tx,
                                              bn_sync=self.config.model.bn_sync, depth_key=depth_key,
                                              ema_step_size=self.ema_step_size,
                                              example_loss=self.example_loss)
        return new_state, steps.accumulate(acc, metrics, state.step)

    def evaluate_step(self, state: TrainState, batch: dict) -> dict:
        return steps.eval_step(state, batch, model=self.eval_model)

    @functools.cached_property
    def _abstract_state(self) -> TrainState:
        return jax.eval_shape(lambda: create_train_state(self.eval_model, self.tx, self.config.train.seed,
                                                         tuple(self.image_shape), self.with_ema))

    def abstract_state(self) -> TrainState:
        """The layout of `init_state()`, traced (once), not compiled."""
        return self._abstract_state

    def init_state(self) -> TrainState:
        init = jax.jit(create_train_state, static_argnums=(0, 1, 2, 3, 4))
        state = init(self.eval_model, self.tx, self.config.train.seed, tuple(self.image_shape), self.with_ema)
        return self.parallel.replicate(jax.device_get(state))

    def empty_accumulator(self):
        """`steps.zero_accumulator` of the metrics `train_step` returns, on the devices."""
        return self.parallel.replicate(steps.zero_accumulator())

    def evaluate(self, state: TrainState) -> dict[str, dict]:
        """Every eval split's {"loss", "error", "top5_error", "examples"}; with a weight EMA,
        its numbers beside them as "ema_loss", "ema_error", "ema_top5_error"."""
        results = self.data.evaluate(state)
        if state.ema is not None:  # the same compiled evaluation: the state's layout is unchanged
            for name, result in self.data.evaluate(state.ema_weights()).items():
                results[name].update({f"ema_{key}": value for key, value in result.items() if key != "examples"})
        return results

    def chunk_length(self, step: int, next_event: int) -> int:
        """Whole chunks, then single steps up to the next event: two compiled variants."""
        return self.steps_per_dispatch if next_event - step >= self.steps_per_dispatch else 1


def _restore_or_init(trainer: Trainer, checkpoints: Checkpoints) -> tuple[TrainState, rundir.RunMeta, bool, list[str]]:
    """The latest good checkpoint, or a fresh state (from `train.init_from` if set); the
    run's bookkeeping; whether a checkpoint was restored; and lines worth telling the user."""
    parallel = trainer.parallel
    restored = checkpoints.restore(abstract_like(trainer.abstract_state(), parallel.replicated))
    if restored:
        global_state, saved_meta, _ = restored
        return parallel.from_global(global_state), rundir.RunMeta.from_json(saved_meta), True, []
    state, notes, init_from = trainer.init_state(), [], trainer.config.train.init_from
    if init_from:
        host = parallel.unreplicate(state)
        params, batch_stats, loaded, fresh = restore.load_initial_weights(init_from, host.params, host.batch_stats)
        notes.append(f"initialised from {init_from}: {len(loaded)} arrays loaded, "
                     f"{len(fresh)} fresh" + (f" ({', '.join(fresh)})" if fresh else ""))
        ema = ema_lib.initial(*jax.tree.map(np.copy, (params, batch_stats))) if trainer.with_ema else None
        state = parallel.replicate(host.replace(params=params, batch_stats=batch_stats, ema=ema))
    return state, rundir.RunMeta(), False, notes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Returns:
      The final evaluation: {split: {"loss", "error", "top5_error", "examples"}} (and the
      weight EMA's "ema_loss", "ema_error", "ema_top5_error" where the run has one), plus
      "step" and "best" ({"step", "error"}: the raw weights').

    Raises:
      UserError: bad config, data or workdir (nothing was compiled or written).
      Preempted: a signal stopped the run after writing a checkpoint.
      NonFinite: the loss became NaN/inf; the last good checkpoint is untouched.
    """
    parallel = Parallel(config.parallel.backend)
    config_lib.validate(config, parallel.num_devices)
    trainer = Trainer(config, parallel)
    data, train_cfg = trainer.data, config.train
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()))
    lock = rundir.prepare(config, workdir, state_bytes)
    needed = rundir.space_needed(config, state_bytes)
    checkpoints = reporter = None
    try:
        checkpoints = Checkpoints(workdir, train_cfg.keep_checkpoints, needed)
        state, meta, restored, notes = _restore_or_init(trainer, checkpoints)
        data.set_state(meta.data_state)
        step = int(parallel.unreplicate(state.step))
        meta.normalization = {"mean": np.asarray(data.normalization[0]).tolist(),
                              "std": np.asarray(data.normalization[1]).tolist()}
        meta.image_shape = list(trainer.image_shape)

        reporter = Reporter(workdir, trainer.total_steps, step, train_cfg.progress, needed)
        reporter.print(f"{config.model.name} on {config.data.name} ({config.data.source}), {parallel.describe()}, "
                       f"global batch {train_cfg.batch_size}, {trainer.steps_per_epoch} steps/epoch, "
                       + (f"resuming at step {step}" if restored else
                          f"from {config.train.init_from}" if config.train.init_from else "from scratch"))
        reporter.started(workdir, checkpoints.directory)
        recipe = [line for line in (steps.describe_loss(config), mix.describe(config.data)) if line]
        for line in recipe + notes + data.start_notes():
            reporter.print(line)
        # Weights not trained here (imported, or fine-tuning's start) are evaluated first.
        evaluate_first = step == 0 and (restored or bool(config.train.init_from)) and meta.best_step is None
        loop = Loop(trainer, state, meta, step, checkpoints, reporter)
        final = loop.run(evaluate_first)
    except BaseException:
        _release(reporter, checkpoints, data, lock, quiet=True)  # the error on its way out is the one to tell
        raise
    _release(reporter, checkpoints, data, lock, quiet=False)

    minutes = (time.time() - reporter.start_time) / 60
    parts = [f"{name} error {100 * r['error']:.2f}% (top-5 {100 * r['top5_error']:.2f}%, "
             + (f"EMA {100 * r['ema_error']:.2f}%, " if "ema_error" in r else "") + f"{r['examples']} images)"
             for name, r in final["results"].items()]
    best = {"step": meta.best_step, "error": meta.best_error}
    if jax.process_index() == 0:
        print(f"done: {config.model.name} on {config.data.name}, step {final['step']}, {minutes:.1f} min: "
              + ", ".join(parts)
              + (f"; best {100 * best['error']:.2f}% at step {best['step']}" if best["error"] is not None else "")
              + (f"; stopped early at step {meta.stopped_early}" if meta.stopped_early else ""), flush=True)
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


def _is_time(step: int, every: int, total: int) -> bool:
    """big_vision's `itstime`: every `every` steps, and at the end."""
    return step == total or (every > 0 and step % every == 0)


def _next_event(step: int, total: int, *periods: int) -> int:
    """The first step after `step` at which the host has something to do."""
    return min([total] + [(step // p + 1) * p for p in periods if p > 0])


class Loop:
    """Chunks of steps until the end (or an early stop); logs, evaluates and checkpoints
    when it is time. Holds what changes as it goes: the state, the step, the device-side
    metric sums, the last evaluation, `meta` (best error, patience) and the log window."""

    def __init__(self, trainer: Trainer, state: TrainState, meta: rundir.RunMeta, step: int,
                 checkpoints: Checkpoints, reporter: Reporter):
        self.trainer, self.state, self.meta, self.step = trainer, state, meta, step
        self.checkpoints, self.reporter = checkpoints, reporter
        train_cfg = trainer.config.train
        self.total = trainer.total_steps
        self.watched = train_cfg.early_stopping_split or next(iter(trainer.data.eval_splits), None)
        self.periods = (train_cfg.log_every, train_cfg.eval_every or trainer.steps_per_epoch,
                        train_cfg.checkpoint_every)
        self.results: dict = {}
        self._new_window()

    def run(self, evaluate_first: bool) -> dict:
        """`evaluate_first`: evaluate before the first step too (imported or fine-tuned
        weights: the first logged error is theirs). Returns {"results", "step"}."""
        if evaluate_first and self.step < self.total and self.watched is not None:
            error, new_best = self.evaluate()
            if new_best and self.step not in self.checkpoints.steps():  # an imported run has its step 0
                self.save(error)
        with rundir.SignalFlag() as interrupt:
            while self.step < self.total and not self.meta.stopped_early:
                self.train_chunk()
                is_log, is_eval, is_checkpoint = (_is_time(self.step, every, self.total) for every in self.periods)
                is_eval = is_eval and self.watched is not None  # data.eval_splits may name none
                if not (is_log or is_eval or is_checkpoint or interrupt.signal):
                    continue
                sums = self.fetch_sums()
                if is_log and sums["steps"]:
                    self.log(sums)
                busy_since = time.time()
                error, new_best = self.evaluate() if is_eval else (None, False)
                # Checkpoints at their cadence, at the end, when stopping, and when an evaluation
                # sets a new best (so the best one always exists to evaluate later).
                if is_checkpoint or new_best or self.meta.stopped_early or interrupt.signal:
                    self.save(error)
                self.paused_s += time.time() - busy_since  # images/s counts training time only
                if interrupt.signal:
                    raise Preempted(f"{interrupt.signal} at step {self.step}: checkpoint saved in "
                                    f"{self.checkpoints.directory}; run the same command again to resume")
        if not self.results and self.watched is not None:  # resumed a finished run: evaluate what is there
            self.results = self.trainer.evaluate(self.state)
        return {"results": self.results, "step": self.step}

    def _new_window(self) -> None:
        """Starts the metrics and the images/s count of the next log line."""
        self.acc = self.trainer.empty_accumulator()
        self.window_start, self.window_step, self.paused_s = time.time(), self.step, 0.0

    def train_chunk(self) -> None:
        """The steps up to the next event (or a whole chunk), in one dispatch."""
        next_event = _next_event(self.step, self.total, *self.periods)
        num_steps = self.trainer.chunk_length(self.step, next_event)
        self.state, self.acc = self.trainer.data.train(self.state, self.acc, num_steps, self.step)
        self.step += num_steps
        self.reporter.advance_to(self.step)

    def fetch_sums(self) -> dict:
        """The metric sums on the host (the loop's only synchronisation).

        Raises:
          NonFinite: a step since the last fetch had a NaN/inf loss or gradient.
        """
        sums = self.trainer.parallel.unreplicate(self.acc)
        if sums["first_nonfinite_step"] != steps.NO_NONFINITE_STEP:
            raise NonFinite(f"non-finite loss or gradient at step {int(sums['first_nonfinite_step'])}; "
                            f"stopped, checkpoints in {self.checkpoints.directory} are untouched "
                            "(lower optim.lr or check the data)")
        return sums

    def log(self, sums: dict) -> None:
        """One training line: the metrics averaged since the last one, lr and images/s."""
        elapsed = time.time() - self.window_start - self.paused_s
        images = (self.step - self.window_step) * self.trainer.config.train.batch_size
        self.reporter.write({"step": self.step, "split": "train",
                             **{k: v / sums["steps"] for k, v in sums["sums"].items()},
                             "lr": float(self.trainer.schedule(self.step - 1)),
                             "images_per_sec": images / max(elapsed, 1e-9)})
        self._new_window()
        for line in self.trainer.data.log_notes():  # the stream: what the model consumes, once
            self.reporter.print(line)

    def evaluate(self) -> tuple[float, bool]:
        """Evaluates every split, tracks the best and the patience; (error, new best?)."""
        meta, patience = self.meta, self.trainer.config.train.early_stopping_patience
        self.results = self.trainer.evaluate(self.state)
        error = self.results[self.watched]["error"]
        new_best = meta.best_error is None or error < meta.best_error
        if new_best:
            meta.best_error, meta.best_step, meta.evals_since_best = error, self.step, 0
        else:
            meta.evals_since_best += 1
        self.reporter.evaluated(self.step, self.results, meta.best_step, meta.best_error, self.watched)
        if patience and meta.evals_since_best >= patience:
            meta.stopped_early = self.step
            self.reporter.print(f"early stopping at step {self.step}: no better {self.watched} error in "
                                f"{patience} evaluations")
        return error, new_best

    def save(self, error: float | None) -> None:
        self.meta.step, self.meta.data_state = self.step, self.trainer.data.get_state()
        self.checkpoints.save(self.step, self.trainer.parallel.to_global(self.state), self.meta.to_json(), error)
