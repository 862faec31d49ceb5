"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{variables,optimizer,meta}`.

`variables` holds what a model needs (params, BN statistics), `optimizer` what only training
needs (step, optimiser state), `meta` the run's JSON bookkeeping (best error, normalisation
statistics, the input pipeline's position): evaluation restores `variables` alone.

Keeps the last `keep` checkpoints and the best by evaluation error. Orbax writes each step
to a temporary directory and renames it when complete, so a kill at any moment leaves the
previous checkpoints intact; a step that is corrupt anyway (a truncated file) is skipped
with a warning in favour of the one before it.
"""

import logging
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from resnet_jax.errors import UserError

managers = ocp.checkpoint_managers


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Checkpoints:
    """Save and restore a run's state (global, replicated jax.Arrays) and JSON metadata."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
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
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, error: float | None = None) -> None:
        """Writes `state` (a TrainState of global jax.Arrays) and `meta` at `step`.

        Args:
          error: the evaluation error at this step, if evaluated; the lowest is kept.
        """
        args = ocp.args.Composite(
            variables=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(meta))
        try:
            self.manager.save(step, args=args, metrics=None if error is None else {"error": error}, force=True)
            self.manager.wait_until_finished()
        except OSError as error_:
            raise UserError(f"cannot write checkpoint {step} in {self.directory}: {error_.strerror or error_}") from None

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
        args = ocp.args.Composite(
            variables=ocp.args.StandardRestore({"params": abstract_state.params,
                                                "batch_stats": abstract_state.batch_stats}),
            optimizer=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            meta=ocp.args.JsonRestore())
        found = self._restore(args, step)
        if found is None:
            return None
        restored, candidate = found
        state = abstract_state.replace(**restored.variables, **restored.optimizer)
        return state, restored.meta, candidate

    def restore_variables(self, abstract_variables: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """Restores only {"params", "batch_stats"} (no optimiser state) and meta. For reading
        a run, not resuming it: unreadable newer steps are skipped, never set aside."""
        args = ocp.args.Composite(variables=ocp.args.StandardRestore(abstract_variables), meta=ocp.args.JsonRestore())
        found = self._restore(args, step, set_aside=False)
        if found is None:
            return None
        restored, candidate = found
        return restored.variables, restored.meta, candidate

    def read_meta(self, step: int) -> dict | None:
        """A checkpoint's JSON metadata alone (cheap: no array is read); None if unreadable."""
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception:  # noqa: BLE001 -- corrupt or partial; the caller tries an older one
            return None

    def _restore(self, args, step: int | None, set_aside: bool = True):
        steps = self.steps()
        if step is not None and step not in steps:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
        unreadable = []
        for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
            try:
                restored = self.manager.restore(candidate, args=args)
            except Exception as error:  # corrupt or partial: Orbax raises many kinds
                reason = (str(error).splitlines() or [""])[0].split(" See full TensorStore details")[0][:200]
                _warn(f"checkpoint {candidate} in {self.directory} is unreadable "
                      f"({type(error).__name__}: {reason}); trying the one before")
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
        self.manager.close()


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
    """The shape/dtype/sharding tree `restore` needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
