"""A run's record, and run-or-skip: the protocol every experiment trains by.

A finished run leaves `done.json` beside the `config.json` and `metrics.jsonl` that
resnet_jax.main wrote: its final and best errors per split, steps, wall time, card, versions
and command. Those three files (no checkpoints, ~150 KB) are everything a study's tables and
figures need, so they can be copied off a machine, committed, and merged with records from
other invocations and machines (`--records`). A run whose record exists is skipped; a run
that diverged leaves `failed.json` (delete it to retry); an interrupted one resumes.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from resnet_jax.errors import NONFINITE_EXIT, PREEMPTED_EXIT, NonFinite, Preempted, UserError, json_kind

from . import machine, supervise
from .spec import RunSpec

RECORD_FILES = ("config.json", "metrics.jsonl", "done.json")


def write_json(path: str, value: Any) -> None:
    """Atomic: a kill leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# What a done.json must hold to say a run finished (`existing` reads these), and a failed.json.
DONE_FIELDS = {"name": str, "step": int, "total_steps": int, "results": dict}
FAILED_FIELDS = {"failed": str}


def read_json(path: str, fields: dict[str, type] | None = None) -> dict | None:
    """The JSON object in `path`; None when the file is missing, or (with a warning) when it
    is unreadable, not an object, or lacks one of `fields` ({name: type}) of its type: a
    record that says nothing is treated as none (a run is trained again, and resumes)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        print(f"warning: ignoring {path}: {str(error).splitlines()[0] if str(error) else error}", file=sys.stderr)
        return None
    problem = None if isinstance(value, dict) else f"it holds {json_kind(value)}, not an object"
    for name, kind in (fields or {}).items():
        field = value.get(name) if problem is None else None
        if problem is None and (not isinstance(field, kind) or isinstance(field, bool) and kind is not bool):
            problem = f"its {name!r} is {json_kind(field)}"
    if problem:
        print(f"warning: ignoring {path}: {problem}", file=sys.stderr)
        return None
    return value


def read_metrics(folder: str) -> list[dict]:
    """metrics.jsonl's records (none when missing)."""
    from resnet_jax import reporting  # the library's reader: the format is its own

    return reporting.read_metrics(folder) if os.path.exists(os.path.join(folder, "metrics.jsonl")) else []


def last_evaluation(workdir: str) -> tuple[int, dict]:
    """(step, {split: record}) of the last evaluation in metrics.jsonl."""
    evals = [r for r in read_metrics(workdir) if r.get("split") != "train" and "error" in r]
    step = max((r["step"] for r in evals), default=0)
    # The same {split: {"loss", "error", ...}} as train_and_evaluate returns in-process.
    return step, {r["split"]: {k: v for k, v in r.items() if k not in ("step", "split")}
                  for r in evals if r["step"] == step}


def best_evaluation(workdir: str) -> dict:
    """{split: {"error", "step"}}: each split's lowest error over the run's evaluations."""
    best: dict[str, dict] = {}
    for r in read_metrics(workdir):
        if r.get("split") != "train" and "error" in r:
            if r["split"] not in best or r["error"] < best[r["split"]]["error"]:
                best[r["split"]] = {"error": r["error"], "step": r["step"]}
    return best


def existing(run: RunSpec, workdir: str, records: Sequence[str] = (),
             log: Callable[[str], None] = print) -> dict | None:
    """The record of a run that need not train again: finished (in `workdir` or in one of
    the `records` folders) or diverged. Its "record_dir" says where its files are.
    """
    total = run.config().train.total_steps
    for folder in [workdir, *(os.path.join(r, run.name) for r in records)]:
        done = read_json(os.path.join(folder, "done.json"), DONE_FIELDS)
        if done and done.get("step") == total:
            where = "" if folder == workdir else f" (record in {folder})"
            log(f"{run.name}: finished earlier (step {total}), skipping{where}")
            return {**done, "record_dir": folder}
    failed_path = os.path.join(workdir, "failed.json")
    failed = read_json(failed_path, FAILED_FIELDS)
    if failed:
        log(f"{run.name}: diverged earlier ({failed['failed']}); delete {failed_path} to retry")
        return {**failed, "record_dir": workdir}
    return None


def saved_steps(workdir: str) -> list[int]:
    """The run's checkpoint steps on disk (the library's one listing of them)."""
    from resnet_jax import rundir  # imports JAX: not before the flags are parsed

    return rundir.saved_steps(workdir)


def resuming(workdir: str) -> bool:
    return bool(saved_steps(workdir))


def finish(run: RunSpec, workdir: str, step: int, results: dict, seconds: float, info: dict,
           records_out: str | None = None) -> dict:
    """The done record of a run that stopped at `step`; written (and copied to
    `records_out`/NAME) when that is its last step: early stopping would end short."""
    total = run.config().train.total_steps
    done = {"name": run.name, "step": step, "total_steps": total, "results": results,
            "best": best_evaluation(workdir), "seconds": seconds, "minutes": seconds / 60,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), "command": run.command(workdir),
            "card": machine.card(info), "versions": info.get("versions", {})}
    if step == total:
        write_json(os.path.join(workdir, "done.json"), done)
        if records_out:
            copy_record(workdir, os.path.join(records_out, run.name))
    return {**done, "record_dir": workdir}


def fail(run: RunSpec, workdir: str, message: str, log: Callable[[str], None] = print) -> dict:
    failed = {"name": run.name, "failed": message}
    write_json(os.path.join(workdir, "failed.json"), failed)
    log(f"{run.name}: diverged: {message}")
    return {**failed, "record_dir": workdir}


def copy_record(workdir: str, dest: str) -> None:
    """The run's record files (never its checkpoints) into `dest`."""
    if os.path.abspath(workdir) == os.path.abspath(dest):
        return
    os.makedirs(dest, exist_ok=True)
    for name in RECORD_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copy2(os.path.join(workdir, name), os.path.join(dest, name))


def child_outcome(run: RunSpec, workdir: str, code: int) -> tuple[int, dict]:
    """(step, results) of a resnet_jax.main child that exited with `code`.

    Raises:
      Preempted (exit 3), NonFinite (exit 4), UserError (anything else non-zero).
    """
    if code == PREEMPTED_EXIT:  # the same exceptions an in-process run raises
        raise Preempted(f"{run.name} was stopped with a checkpoint; run the same command again to resume")
    if code == NONFINITE_EXIT:
        raise NonFinite(f"{run.name}: non-finite loss (see its output)")
    if code:
        raise UserError(f"{run.name} exited with code {code} (its error is in its output): {run.command(workdir)}")
    return last_evaluation(workdir)


def run_or_skip(run: RunSpec, workdir: str, log: Callable[[str], None] = print, records: Sequence[str] = (),
                records_out: str | None = None) -> dict:
    """Trains `run` in `workdir` in this process unless its record says it finished (or, when
    it needs another device count than this process has, as its command in a subprocess).

    Returns:
      The done record (see `finish`), or {"name", "failed": message} for a run that
      diverged; "record_dir" says where its files are.

    Raises:
      UserError / Preempted: from the run (a subprocess's exit 2 / 3 likewise).
    """
    found = existing(run, workdir, records, log)
    if found:
        return found
    config = run.config()
    log(f"{run.name}: {'resuming' if resuming(workdir) else 'training'}: {run.command(workdir)}")
    start = time.time()
    import jax  # after the flags are parsed: bad flags fail before JAX loads

    from resnet_jax import train

    try:
        if run.devices and run.devices != jax.device_count():
            command = [sys.executable, "-m", "resnet_jax.main", *run.args(workdir)]
            child = supervise.run(command, env=run.env())
            step, results = child_outcome(run, workdir, child.code)
            info = machine.probe(env=run.env())
        else:
            result = train.train_and_evaluate(config, workdir)
            step, results = result["step"], {k: v for k, v in result.items() if k not in ("step", "best")}
            info = machine.describe()
    except NonFinite as error:
        return fail(run, workdir, str(error), log)
    return finish(run, workdir, step, results, time.time() - start, info, records_out)
