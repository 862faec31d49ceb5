"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{variables,optimizer,meta[,ema]}`.

`variables` holds what a model needs (params, BN statistics), `optimizer` what only training
needs (step, optimiser state), `meta` the run's JSON bookkeeping (best error, normalisation
statistics, the input pipeline's position): evaluation restores `variables` alone. A run
with a weight EMA also has `ema`, laid out as `variables` (so it evaluates the same way);
runs without one have no such item.

Keeps the last `keep` checkpoints and the best by evaluation error. Orbax writes each step
to a temporary directory and renames it when complete, so a kill at any moment leaves the
previous checkpoints intact; a step that is corrupt anyway (a truncated file) is skipped
with a warning in favour of the one before it.
"""

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from resnet_jax.errors import UserError, disk_full, is_disk_full, json_kind

managers = ocp.checkpoint_managers
T = TypeVar("T")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_numbers(value: Any) -> bool:
    """A non-empty list of numbers, or of such lists: per_pixel_mean's mean is [H][W][C]."""
    return isinstance(value, list) and bool(value) and all(_is_number(v) or _is_numbers(v) for v in value)


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a checkpoint's meta item (JSON the trainer wrote), or None.

    The fields the readers use are checked for type: step, best_step, best_error,
    evals_since_best, stopped_early, image_shape ([H, W, C]) and normalization
    ({"mean", "std"}: lists of numbers).
    """
    if not isinstance(meta, dict):
        return f"its meta holds {json_kind(meta)}, not an object"
    optional = {"best_step": _is_int, "best_error": _is_number, "stopped_early": _is_int, "step": _is_int,
                "evals_since_best": _is_int}
    for key, check in optional.items():
        if meta.get(key) is not None and not check(meta[key]):
            return f"its meta's {key} is {json_kind(meta[key])} {meta[key]!r:.40}"
    shape = meta.get("image_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(n) and n > 0
                                                                                      for n in shape)):
        return f"its meta's image_shape is {shape!r:.60}, not [height, width, channels]"
    norm = meta.get("normalization")
    if norm is not None and not (isinstance(norm, dict) and all(
            _is_numbers(norm.get(k)) for k in ("mean", "std"))):
        return f"its meta's normalization is {norm!r:.60}, not {{\"mean\": [...], \"std\": [...]}}"
    return None


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax's writer threads log a failed write (with its traceback) before the save raises
    it; the raised error is what the user is told, in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


WEIGHT_ITEMS = {"raw": "variables", "ema": "ema"}  # which weights -> the item holding them


def _state_args(abstract_state: Any) -> ocp.args.Composite:
    """What a whole TrainState is saved as: the variables, the optimiser, the meta; the EMA
    where the state has one."""
    ema = {} if abstract_state.ema is None else {"ema": ocp.args.StandardRestore(abstract_state.ema)}
    return ocp.args.Composite(
        variables=ocp.args.StandardRestore({"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}),
        optimizer=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
        meta=ocp.args.JsonRestore(), **ema)


def _as_state(abstract_state: Any, restored: Any, step: int) -> tuple[Any, dict, int]:
    """(TrainState, meta, step) from what `_state_args` restored."""
    ema = {} if abstract_state.ema is None else {"ema": restored.ema}
    return (abstract_state.replace(**restored.variables, **restored.optimizer, **ema), dict(restored.meta), step)


class Checkpoints:
    """Save and restore a run's state (global, replicated jax.Arrays) and JSON metadata."""

    def __init__(self, workdir: str, keep: int = 3, needed_bytes: int | None = None):
        """Args:
          workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
          keep: how many of the latest to keep (the best is kept besides).
          needed_bytes: what the run needs on disk, for the message when the disk is full.
        """
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.needed_bytes = needed_bytes
        keep_best = managers.BestN(
            get_metric_fn=lambda metrics: metrics["error"], reverse=True, n=1,  # lowest error
            keep_checkpoints_without_metrics=False,
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=managers.AnyPreservationPolicy([managers.LatestN(keep), keep_best]),
            enable_async_checkpointing=False,  # a step returns once its checkpoint is complete
            create=True,
        )
        logging.getLogger("absl").setLevel(logging.WARNING)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(self.directory, os.path.dirname(self.directory), needed_bytes) from None
            raise UserError(f"cannot open {self.directory}: {error.strerror or error}") from None

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, error: float | None = None) -> None:
        """Writes `state` (a TrainState of global jax.Arrays) and `meta` at `step`.

        Args:
          error: the evaluation error at this step, if evaluated; the lowest is kept.
        """
        ema = {} if state.ema is None else {"ema": ocp.args.StandardSave(state.ema)}
        args = ocp.args.Composite(
            variables=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(meta), **ema)
        try:
            with _quiet_orbax():
                self.manager.save(step, args=args, metrics=None if error is None else {"error": error}, force=True)
                self.manager.wait_until_finished()
        except Exception as error_:  # noqa: BLE001 -- TensorStore reports a full disk as ValueError
            if is_disk_full(error_):
                self._remove_partial(step)
                raise disk_full(f"checkpoint {step}", self.directory, self.needed_bytes) from None
            if isinstance(error_, OSError):
                raise UserError(f"cannot write checkpoint {step} in {self.directory}: "
                                f"{error_.strerror or error_}") from None
            raise

    def _remove_partial(self, step: int) -> None:
        """Deletes what a failed save of `step` left (Orbax's temporary directory, never a
        complete step), so the space it took is free again."""
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
            if name.startswith(f"{step}.") and "tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """Restores a whole TrainState at `step`, or the newest good checkpoint; None when
        there is none.

        Args:
          abstract_state: TrainState of jax.ShapeDtypeStruct with the shardings to restore
            onto, so a run saved on 4 devices resumes on 1 or 2.
          step: a particular step; an error if it is missing or corrupt.

        Raises:
          UserError: checkpoints exist but none can be read.
        """
        found = self._restore(_state_args(abstract_state), step)
        return None if found is None else _as_state(abstract_state, *found)

    def restore_variables(self, abstract_variables: Any, step: int | None = None,
                          weights: str = "raw") -> tuple[Any, dict, int] | None:
        """Restores only {"params", "batch_stats"} (no optimiser state) and meta. For reading
        a run, not resuming it: unreadable newer steps are skipped, never set aside.
        `weights`: "raw", or "ema" for the weight EMA's (a run that has one)."""
        item = WEIGHT_ITEMS[weights]
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_variables)}, meta=ocp.args.JsonRestore())
        found = self._restore(args, step, set_aside=False)
        if found is None:
            return None
        restored, candidate = found
        return restored[item], restored.meta, candidate

    def read_meta(self, step: int) -> dict | None:
        """A checkpoint's JSON metadata alone (cheap: no array is read); None if unreadable."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # noqa: BLE001 -- corrupt or partial; the caller tries an older one
            return None
        return None if meta_problem(meta) else dict(meta)

    def _restore(self, args, step: int | None, set_aside: bool = True):
        steps = self.steps()
        if step is not None and step not in steps:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
        unreadable = []
        for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
            try:
                restored = self.manager.restore(candidate, args=args)
                problem = meta_problem(restored.meta)
            except Exception as error:  # corrupt or partial: Orbax raises many kinds
                reason = (str(error).splitlines() or [""])[0].split(" See full TensorStore details")[0][:200]
                problem = f"{type(error).__name__}: {reason}"
            if problem:
                if step is not None:
                    raise UserError(f"checkpoint {step} in {self.directory} is unreadable ({problem}); "
                                    "choose another step")
                _warn(f"checkpoint {candidate} in {self.directory} is unreadable ({problem}); trying the one before")
                unreadable.append(candidate)
                continue
            if step is None and set_aside:
                self._set_aside(unreadable)
            return restored, candidate
        if steps:
            raise UserError(
                f"no readable checkpoint in {self.directory} (steps {steps}); move it away or set "
                "--config.overwrite=True to start over"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps newer than the one resumed to `corrupt_checkpoints/`, so
        the run can write those steps again; nothing is deleted."""
        if not steps or jax.process_index() != 0:
            return
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            source = os.path.join(self.directory, str(step))
            target = os.path.join(aside, f"{step}_{int(time.time())}")
            os.rename(source, target)
            _warn(f"moved unreadable checkpoint {step} to {target}")
        self.manager.reload()

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as error:  # noqa: BLE001 -- TensorStore reports a full disk as ValueError
            if is_disk_full(error):
                raise disk_full(f"the last of {self.directory}", self.directory, self.needed_bytes) from None
            raise


# ---------------------------------------------------------------------------------------
# Reading beside a writer: evaluation, conversion and the analyses of a run that may be
# training at this moment (its trainer saving new steps and deleting old ones).

READ_ATTEMPTS = 8


class Vanished(Exception):
    """A checkpoint disappeared while it was being read: choose again."""


class CheckpointReader:
    """Read-only access to a run's checkpoints, safe beside the process training in it.

    Lists only complete steps (Orbax renames a step's directory into place once it is
    whole; its temporary directories are not listed), reads them with a plain Orbax
    Checkpointer (no CheckpointManager: nothing cached, created, moved or deleted), and
    raises `Vanished` when a step disappears under it, so that `read_retrying` chooses
    again. An unreadable step is skipped, never set aside (only the run's owner does that).
    """

    def __init__(self, workdir: str, writer: Callable[[], str | None] = lambda: None):
        """Args:
          workdir: the run's directory.
          writer: says who is training there now ("process 123 on host"), or None: for
            the advice when nothing is readable.
        """
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.writer = writer
        self.checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

    def steps(self) -> list[int]:
        """The complete steps on disk now, ascending."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def _read(self, step: int, args) -> Any:
        """One step's items. Raises Vanished if the step is gone after a failed read; the
        read's error if it is still there (twice: a step being deleted fails first)."""
        path = os.path.join(self.directory, str(step))
        for attempt in range(2):
            try:
                return self.checkpointer.restore(path, args=args)
            except Exception:  # noqa: BLE001 -- Orbax raises many kinds; the directory tells
                time.sleep(0.1)
                if not os.path.isdir(path):
                    raise Vanished(step) from None
                if attempt:
                    raise

    def read_meta(self, step: int) -> dict | None:
        """A step's metadata; None if it is unreadable or of the wrong kind.

        Raises:
          Vanished: the step is gone.
        """
        try:
            meta = self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Vanished:
            raise
        except Exception:  # noqa: BLE001 -- corrupt or partial; the caller tries an older one
            return None
        return None if meta_problem(meta) else dict(meta)

    def restore_variables(self, abstract_variables: Any, step: int | None = None,
                          weights: str = "raw") -> tuple[Any, dict, int] | None:
        """{"params", "batch_stats"} and meta of `step`, or of the newest readable step;
        `weights`: "raw", or "ema" for the weight EMA's."""
        item = WEIGHT_ITEMS[weights]
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_variables)}, meta=ocp.args.JsonRestore())
        found = self._restore(args, step)
        return None if found is None else (found[0][item], dict(found[0].meta), found[1])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """The whole TrainState (optimiser too) and meta of `step`, or of the newest readable."""
        found = self._restore(_state_args(abstract_state), step)
        return None if found is None else _as_state(abstract_state, *found)

    def _restore(self, args, step: int | None):
        steps = self.steps()
        if step is not None and step not in steps:
            raise Vanished(step)
        vanished = False
        for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
            try:
                restored = self._read(candidate, args)
                problem = meta_problem(restored.meta)
            except Vanished:
                if step is not None:
                    raise
                vanished = True
                continue
            except Exception as error:  # noqa: BLE001 -- corrupt or partial
                reason = (str(error).splitlines() or [""])[0].split(" See full TensorStore details")[0][:200]
                problem = f"{type(error).__name__}: {reason}"
            if not problem:
                return restored, candidate
            if step is not None:
                raise UserError(f"checkpoint {step} in {self.directory} is unreadable ({problem}); choose another "
                                "step (--checkpoint)")
            _warn(f"checkpoint {candidate} in {self.directory} is unreadable ({problem}); trying the one before")
        if vanished:
            raise Vanished(step)
        if steps:
            raise self.nothing_readable(steps)
        return None

    def nothing_readable(self, steps: list[int]) -> UserError:
        writer = self.writer()
        if writer:
            return UserError(f"no readable checkpoint in {self.directory} (steps {steps}) while {writer} trains "
                             "there; try again after its next checkpoint")
        return UserError(f"no readable checkpoint in {self.directory} (steps {steps}); resuming the run with "
                         "resnet_jax.main (its config, the same --workdir) sets unreadable steps aside and writes "
                         "new ones")

    def close(self) -> None:
        self.checkpointer.close()


def read_retrying(read: Callable[[], T], directory: str) -> T:
    """`read()` (it lists, chooses and reads checkpoints), again whenever a checkpoint it
    chose vanished under it (`Vanished`: a live run's trainer deleted it): at most
    READ_ATTEMPTS times.

    Raises:
      UserError: the checkpoints kept vanishing.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except Vanished:
            time.sleep(0.05 * (attempt + 1))
    raise UserError(f"the checkpoints in {directory} kept changing while being read ({READ_ATTEMPTS} tries): a run "
                    "is training there and replacing them; try again, or keep more of them "
                    "(train.keep_checkpoints)")


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
    """The shape/dtype/sharding tree `restore` needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
