"""Training an experiment's runs: one after another in this process, or K at once.

`train_all` is the one entry point the experiments use. With `concurrent=1` and no budget
each run trains in this process (`records.run_or_skip`). Otherwise each run is its
`python -m resnet_jax.main` command in a child process, up to `concurrent` at once, all
sharing one persistent compilation cache, each taking only the GPU memory it needs, under
CUDA MPS where the machine has it (`gpu_share`). With `budget_s` only the runs the planner
predicts to finish inside it start (whole runs only); the others are left, and said so.
A SIGTERM to the experiment reaches every child (each checkpoints and exits 3).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence

from resnet_jax.errors import PREEMPTED_EXIT, NonFinite, Preempted, UserError

from . import gpu_share, machine, planner, records, supervise
from . import spec as spec_lib
from .spec import RunSpec


@dataclasses.dataclass
class Outcome:
    """What `train_all` did.

    Attributes:
      done: run name -> its record (finished now or earlier, or diverged), in plan order.
      left: run name -> why it did not run to its end (not started: predicted too long;
        stopped by a signal or the deadline: it resumes from its checkpoint).
      concurrency, mps: how the runs shared the machine.
    """

    done: dict[str, dict] = dataclasses.field(default_factory=dict)
    left: dict[str, str] = dataclasses.field(default_factory=dict)
    concurrency: int = 1
    mps: bool = False


def sharing(concurrent: str, calibration: str, budget_s: float) -> tuple[int | str, planner.Calibration | None]:
    """--concurrent, --calibration and --budget_s, checked together before anything runs.

    Raises:
      UserError: a bad --concurrent, a missing or malformed calibration.json, or "auto" /
        a budget without one.
    """
    value = spec_lib.parse_concurrent(concurrent)
    calibrated = planner.Calibration.load(calibration) if calibration else None
    if calibrated is None and (value == "auto" or budget_s):
        flag = "--concurrent=auto" if value == "auto" else "--budget_s"
        raise UserError(f"{flag} needs --calibration=calibration.json (python -m experiments.device_suite "
                        "--parts=calibrate writes it)")
    return value, calibrated


def resolve_concurrency(value: int | str, calibration: planner.Calibration | None,
                        models: Sequence[str]) -> tuple[int, bool]:
    """--concurrent (a number or "auto") -> (runs at once, use MPS if present)."""
    if value == "auto":
        if calibration is None:
            raise UserError("--concurrent=auto needs --calibration=calibration.json (python -m "
                            "experiments.device_suite --parts=calibrate writes it)")
        return calibration.best_concurrency(models)
    return int(value), True


def train_all(runs: Sequence[tuple[RunSpec, str]], *, concurrent: int | str = 1, log: Callable[[str], None] = print,
              records_in: Sequence[str] = (), records_out: str | None = None, budget_s: float = 0,
              calibration: planner.Calibration | None = None, logs_dir: str | None = None,
              cache_dir: str | None = None, grace_s: float = 30.0, cwd: str | None = None, in_process: bool = True,
              deadline: float | None = None, stop_when: Callable[[], bool] | None = None) -> Outcome:
    """Trains what is not recorded yet of `runs` ((spec, workdir), in order); see the module
    docstring.

    Args:
      in_process: whether one run at a time may train in this process (False: always as a
        child, for a caller that must keep off the accelerator).
      deadline: when children still running get SIGTERM (`grace_s` before) and a kill
        (default: the end of `budget_s`, if any); the planner keeps it a safety net.
      stop_when: polled; once true, children get their SIGTERM and nothing new starts.

    Raises:
      UserError: --budget_s without a calibration, or a run's command failed.
      Preempted: a signal stopped runs (they resume with the same command).
    """
    if budget_s and calibration is None:
        raise UserError("--budget_s needs --calibration=calibration.json (python -m experiments.device_suite "
                        "--parts=calibrate writes it)")
    models = [spec.config().model.name for spec, _ in runs]
    k, use_mps = resolve_concurrency(concurrent, calibration, models)
    outcome = Outcome(concurrency=k)
    todo = []
    for index, (spec, workdir) in enumerate(runs, 1):
        found = records.existing(spec, workdir, records_in, lambda line, i=index: log(f"[{i}/{len(runs)}] {line}"))
        if found:
            outcome.done[spec.name] = found
        else:
            todo.append((index, spec, workdir))
    if budget_s and todo:
        planned = planner.plan([(s.name, s.config().model.name, s.config().train.total_steps) for _, s, _ in todo],
                               calibration, budget_s, k, use_mps and calibration.mps_works)
        for p in planned:
            if not p.start:
                outcome.left[p.name] = (f"not started: predicted {p.predicted_s:.0f} s from {p.begin_s:.0f} s, "
                                        f"past the budget of {budget_s:.0f} s; left for the next invocation")
                log(f"{p.name}: {outcome.left[p.name]}")
        todo = [t for t, p in zip(todo, planned) if p.start]
    if k == 1 and not budget_s and in_process:
        for index, spec, workdir in todo:
            outcome.done[spec.name] = records.run_or_skip(spec, workdir, lambda line, i=index: log(
                f"[{i}/{len(runs)}] {line}"), records_out=records_out)
        return _ordered(outcome, runs)
    if todo:
        end = deadline or (time.time() + budget_s if budget_s else None)
        _train_children(todo, len(runs), outcome, k, use_mps, log, records_out, end, logs_dir, cache_dir,
                        grace_s, cwd, stop_when)
    return _ordered(outcome, runs)


def train_in(workdir: str, planned: Sequence[RunSpec], *, concurrent: int | str, calibration: planner.Calibration | None,
             records_in: Sequence[str], budget_s: float, log: Callable[[str], None]) -> Outcome:
    """`train_all` for an experiment's folder: each run in WORKDIR/<run name>; records found
    in `records_in` skip their run, and new ones are copied into the first of them."""
    return train_all([(run, os.path.join(workdir, run.name)) for run in planned], concurrent=concurrent, log=log,
                     records_in=records_in, records_out=records_in[0] if records_in else None, budget_s=budget_s,
                     calibration=calibration)


def exit_if_left(left: dict[str, str]) -> None:
    """Exits 3 (as a preempted run does) naming the runs left for the next invocation."""
    if left:
        print(f"left for the next invocation: {', '.join(left)}; run the same command again to continue", flush=True)
        sys.exit(PREEMPTED_EXIT)


def _ordered(outcome: Outcome, runs: Sequence[tuple[RunSpec, str]]) -> Outcome:
    outcome.done = {s.name: outcome.done[s.name] for s, _ in runs if s.name in outcome.done}
    return outcome


def _train_children(todo, total: int, outcome: Outcome, k: int, use_mps: bool, log, records_out, end, logs_dir,
                    cache_dir, grace_s, cwd, stop_when) -> None:
    first_dir = todo[0][2]
    logs_dir = logs_dir or os.path.join(os.path.dirname(first_dir), "logs")
    # A compilation cache the environment already names (a user's, a test suite's) is shared
    # with it: programs compiled there before need not compile again in these children.
    cache_dir = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or cache_dir
                 or os.path.join(os.path.dirname(first_dir), "jax_cache"))
    os.makedirs(logs_dir, exist_ok=True)
    env = gpu_share.child_env(k, cache_dir)
    info = machine.probe(cwd=cwd, env=env)  # the card, from a child: this process keeps off the GPU
    log(f"{len(todo)} run(s), up to {k} at once on {machine.card(info)}")
    errors = []
    with gpu_share.mps(log, enabled=k > 1 and use_mps) as mps_env, \
            supervise.Supervisor(cwd, stop_when) as supervisor:
        outcome.mps = bool(mps_env)
        queue, running = list(todo), {}
        while queue or running:
            while queue and len(running) < k and not supervisor.stop_signal and not (stop_when and stop_when()):
                index, spec, workdir = queue.pop(0)
                log_path = os.path.join(logs_dir, f"{spec.name}.log")
                log(f"[{index}/{total}] {spec.name}: {'resuming' if records.resuming(workdir) else 'training'}: "
                    f"{spec.command(workdir)} (output: {log_path})")
                command = [sys.executable, "-m", "resnet_jax.main", *spec.args(workdir)]
                child = supervisor.start(spec.name, command, log_path, {**env, **mps_env, **spec.env()},
                                         term_at=end - grace_s if end else None, kill_at=end, grace_s=grace_s)
                running[spec.name] = (child, spec, workdir)
            stopping = supervisor.stop_signal or (stop_when is not None and stop_when())
            if stopping and queue:
                for _, spec, _ in queue:
                    outcome.left[spec.name] = f"not started: stopped by {supervisor.stop_signal or 'the caller'}"
                queue = []
            for child in supervisor.poll():
                _, spec, workdir = running.pop(child.key)
                try:
                    step, results = records.child_outcome(spec, workdir, child.code)
                except Preempted:
                    outcome.left[spec.name] = "stopped with a checkpoint; the same command resumes it"
                    log(f"{spec.name}: {outcome.left[spec.name]}")
                    continue
                except NonFinite as error:
                    outcome.done[spec.name] = records.fail(spec, workdir, str(error), log)
                    continue
                except UserError as error:
                    if child.stopped:  # killed at the deadline before it could checkpoint
                        outcome.left[spec.name] = f"stopped (exit {child.code}); the same command resumes it"
                    else:
                        errors.append(error)
                        log(f"{spec.name}: {error}")
                    continue
                outcome.done[spec.name] = records.finish(spec, workdir, step, results, child.seconds, info,
                                                         records_out)
                log(f"{spec.name}: finished in {child.seconds:.1f} s")
            if running:
                time.sleep(0.1)
    if errors:
        raise errors[0]
    if supervisor.stop_signal:
        raise Preempted(f"stopped by {supervisor.stop_signal}: {', '.join(outcome.left)}; run the same "
                              "command again to continue")
