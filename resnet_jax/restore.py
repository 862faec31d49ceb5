"""A trained run loaded back: for evaluation, conversion, the analyses, the tests and
fine-tuning's start.

    run = restore.load(workdir, "best")        # config, variables, step, meta, note
    state, step = restore.load_state(workdir)  # the whole TrainState (optimiser too)

Only the run's directory is read: the model from config.json, params and BN statistics
(and the input statistics, in `meta`) from a checkpoint; no training data. Loading never
changes the run (an unreadable newest checkpoint is skipped, not set aside).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from resnet_jax import ema as ema_lib
from resnet_jax import optim, rundir, steps
from resnet_jax.checkpoint import CheckpointReader, Checkpoints, Vanished, abstract_like, read_retrying
from resnet_jax.errors import UserError


@dataclasses.dataclass
class TrainedRun:
    """A checkpoint of a run, restored.

    Attributes:
      workdir: the run's directory.
      config: the ConfigDict it was trained with.
      variables: {"params", "batch_stats"}: host numpy arrays, or on the devices when `load`
        was given a sharding.
      step: the checkpoint's step.
      meta: the checkpoint's bookkeeping.
      requested: "best", "latest" or the step asked for.
      note: why "best" fell back to the latest checkpoint, else None.
    """

    workdir: str
    config: ml_collections.ConfigDict
    variables: dict
    step: int
    meta: rundir.RunMeta
    requested: str | int
    note: str | None

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the inputs the model was trained on.

        Raises:
          UserError: a checkpoint of an older resnet_jax, which did not record them.
        """
        if not self.meta.normalization:
            raise UserError(f"checkpoint {self.step} in {rundir.checkpoint_dir(self.workdir)} carries no "
                            "normalisation statistics (written by an older resnet_jax); train the run again")
        return (np.asarray(self.meta.normalization["mean"], np.float32),
                np.asarray(self.meta.normalization["std"], np.float32))


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def default_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The input shape of runs whose checkpoints do not record one (RGB at data.image_size)."""
    return (config.data.image_size, config.data.image_size, 3)


WEIGHTS = ("raw", "ema")


def check_weights(config: ml_collections.ConfigDict, workdir: str, weights: str) -> None:
    """Raises UserError unless the run in `workdir` has the `weights` asked for."""
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights={weights!r}; choose from {', '.join(WEIGHTS)}")
    if weights == "ema" and not ema_lib.enabled(config.train):
        raise UserError(f"the run in {workdir} has no weight EMA (it trained with train.ema_decay=0); use "
                        "--weights=raw, or train with --config.train.ema_decay=0.9999 for one")


def load(workdir: str, checkpoint: str | int = "best", sharding: jax.sharding.Sharding | None = None,
         announce: bool = True, weights: str = "raw") -> TrainedRun:
    """Restores a run's params and BN statistics (no optimiser state).

    Args:
      workdir: a directory written by training or by `convert import`.
      checkpoint: "best" (the step recorded as best; the latest if none, see
        `rundir.choose_checkpoint`), "latest" (the newest readable) or a step.
      sharding: where the arrays go (e.g. replicated over every device); None: host numpy.
      announce: print a `note:` line when "best" falls back (the note is in the result too).
      weights: "raw" (the trained weights) or "ema" (their weight EMA: train.ema_decay > 0).

    Raises:
      UserError: no run, no checkpoint, a step not on disk, or none readable; no EMA.
    """
    workdir = os.path.expanduser(workdir)
    config = rundir.load_config(workdir)  # UserError for a missing workdir or config.json
    check_weights(config, workdir, weights)
    which = rundir.parse_checkpoint(checkpoint)
    rundir.check_checkpoint(workdir, which)  # no run or no such step: one error before any reading
    directory = rundir.checkpoint_dir(workdir)
    target_sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Read-only and safe beside a run training in `workdir` this moment: complete steps only,
    # chosen again when the trainer deletes one being read (see checkpoint.CheckpointReader).
    checkpoints = CheckpointReader(workdir, lambda: rundir.live_holder(workdir))

    def read():
        rundir.check_checkpoint(workdir, which)  # a step asked for may have been deleted since
        target, note = rundir.choose_checkpoint(checkpoints, which)
        # The layout comes from the metadata of the step to be read (or the newest one).
        meta = rundir.RunMeta.from_json(_layout_meta(checkpoints, target))
        image_shape = tuple(meta.image_shape or default_image_shape(config))
        abstract = steps.abstract_variables(config, image_shape)
        return checkpoints.restore_variables(abstract_like(abstract, target_sharding), target, weights), note

    try:
        restored, note = read_retrying(read, checkpoints.directory)
    finally:
        checkpoints.close()
    if restored is None:  # every step vanished: the run was started over
        raise UserError(f"no checkpoints in {directory}")
    variables, saved_meta, step = restored
    if sharding is None:
        variables = jax.tree.map(np.asarray, jax.device_get(variables))
    if note and announce:
        _note(note)
    return TrainedRun(workdir, config, variables, int(step), rundir.RunMeta.from_json(saved_meta), str(which),
                      note)


def _layout_meta(checkpoints: CheckpointReader, target: int | None) -> dict:
    """The metadata of the step to read (`target`, or the newest readable one).

    Raises:
      Vanished: the step disappeared (choose again).
      UserError: `target` is unreadable, or none is.
    """
    saved = checkpoints.steps()
    if not saved:
        raise Vanished(target)
    for step in [target] if target is not None else reversed(saved):
        meta = checkpoints.read_meta(step)
        if meta is not None:
            return meta
    if target is not None:
        raise UserError(f"checkpoint {target} in {checkpoints.directory} is unreadable; choose another step "
                        "(--checkpoint)")
    raise checkpoints.nothing_readable(saved)


def optimizer_for(config: ml_collections.ConfigDict):
    """An optimiser of the run's kind: the layout of its state does not depend on the
    schedule's lengths, so none are needed (no data is read)."""
    schedule = optim.make_schedule(config.optim, 1, max(config.train.total_steps, 1))
    return optim.make_optimizer(config.optim, schedule)


def load_state(workdir: str, step: int | None = None) -> tuple[steps.TrainState, int]:
    """The whole TrainState saved in `workdir` (host numpy arrays) and its step: `step`, or
    the newest readable checkpoint.

    Raises:
      UserError: as `load`.
    """
    config = rundir.load_config(workdir)
    rundir.check_checkpoint(workdir, "latest" if step is None else step)
    checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
    try:
        newest = step if step is not None else max(checkpoints.steps())
        meta = rundir.RunMeta.from_json(checkpoints.read_meta(newest))
        image_shape = tuple(meta.image_shape or default_image_shape(config))
        model, tx = steps.build_model(config), optimizer_for(config)
        abstract = jax.eval_shape(lambda: steps.create_train_state(model, tx, config.train.seed, image_shape,
                                                                   ema_lib.enabled(config.train)))
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        restored = checkpoints.restore(abstract_like(abstract, sharding), step)
    finally:
        checkpoints.close()
    state, _, restored_step = restored
    return jax.device_get(state), int(restored_step)


def new_state(config: ml_collections.ConfigDict, params: Any, batch_stats: Any) -> steps.TrainState:
    """A TrainState at step 0 holding the given variables and a fresh optimiser state (and,
    where the config asks for one, a weight EMA starting from them)."""
    params, batch_stats = jax.tree.map(jnp.asarray, (params, batch_stats))
    ema = ema_lib.initial(*jax.tree.map(jnp.copy, (params, batch_stats))) if ema_lib.enabled(config.train) else None
    return steps.TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer_for(config).init(params), ema)


# ---------------------------------------------------------------------------------------
# Fine-tuning's start.


def load_initial_weights(path: str, params: Any, batch_stats: Any) -> tuple[Any, Any, list[str], list[str]]:
    """Fine-tuning: the params and BN statistics of the run in `path` where they fit.

    Every variable of `params`/`batch_stats` whose path and shape the run in `path` has is
    taken from there; the others (a head for another number of classes, say) keep the values
    given (a fresh initialisation).

    Args:
      path: a workdir: one written by `convert import`, or any run's (its best checkpoint,
        else its latest).
      params, batch_stats: the new run's freshly initialised variables (host arrays).

    Returns:
      (params, batch_stats, loaded, fresh): loaded and fresh are variable names such as
      "params/head/kernel"; loaded arrays are numpy float32.

    Raises:
      UserError: `path` is no run, or nothing in it fits the model.
    """
    if os.path.isfile(path):
        raise UserError(f"train.init_from={path} is a file; convert it into a workdir first: "
                        "python -m resnet_jax.convert import --format=... --file=... --config=... --workdir=DIR")
    # An imported run has no best step: its one checkpoint is the start, nothing to announce.
    source = load(path, "best", announce=False).variables
    merged, loaded, fresh = merge(source, {"params": params, "batch_stats": batch_stats})
    if not loaded:
        raise UserError(f"nothing in {path} fits this model (its variables differ in name or shape): "
                        "is train.init_from the right run?")
    return merged["params"], merged["batch_stats"], loaded, fresh


def merge(source: dict, target: dict) -> tuple[dict, list[str], list[str]]:
    """`target` with every leaf of the same path and shape in `source` taken from there."""
    have = traverse_util.flatten_dict(source)
    merged, loaded, fresh = {}, [], []
    for path, leaf in traverse_util.flatten_dict(target).items():
        name = "/".join(path)
        candidate = have.get(path)
        if candidate is not None and tuple(np.shape(candidate)) == tuple(np.shape(leaf)):
            merged[path] = np.asarray(candidate, np.asarray(leaf).dtype)
            loaded.append(name)
        else:
            merged[path] = leaf
            fresh.append(name)
    return traverse_util.unflatten_dict(merged), loaded, fresh
