"""A run's directory: config.json, the lock, the signals, its saved steps and which to load.

`prepare` is called once the config and the data have been validated and before anything is
compiled: it takes the lock, refuses a different run, checks the directory is writable with
room for the checkpoints, and writes config.json. `load_config` reads config.json back;
`saved_steps` lists the checkpoints on disk and `choose_checkpoint` turns "best", "latest"
or a step into the step to restore, by one rule. `RunMeta` is the run's bookkeeping that
every checkpoint carries.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
from typing import Any

import jax
import ml_collections

from resnet_jax import config as config_lib
from resnet_jax.errors import UserError, disk_full, is_disk_full, json_kind

# Fields that define what a run *is*: resuming with any of them changed would mix two runs.
IDENTITY_FIELDS = ("model", "data.source", "data.name", "data.path", "data.image_size", "data.normalization",
                   "data.num_classes", "data.train_split", "train.batch_size", "train.seed")
LOCK_FILE = ".lock"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"model.name": ..., "train.batch_size": ...}: the form config.json holds."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def write_config(config: ml_collections.ConfigDict, workdir: str, needed_bytes: int | None = None) -> None:
    """Writes `workdir/config.json` (process 0 only), atomically: a full disk or a kill
    leaves the old file or the new one, never half of one.

    Raises:
      UserError: it could not be written (a full disk: DiskFull).
    """
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as f:
            json.dump(flatten(config), f, indent=2, sort_keys=True)
        os.replace(partial, path)
    except OSError as error:
        if os.path.exists(partial):
            os.remove(partial)
        if is_disk_full(error):
            raise disk_full(path, workdir, needed_bytes) from None
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def space_needed(config: ml_collections.ConfigDict, state_bytes: int) -> int:
    """What a run needs on disk, about: its kept checkpoints, the best one and the one being
    written (each the size of the state), plus room for metrics and TensorBoard events."""
    return state_bytes * (config.train.keep_checkpoints + 2) + (1 << 20)


def _identity(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in IDENTITY_FIELDS)}


class Lock:
    """One run per workdir: an exclusive flock on `workdir/.lock`, which holds "PID HOST".

    The operating system drops the lock when its process dies, however it dies, so a lock
    left by a dead process is simply taken over (with a warning naming it).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> None:
        """Raises UserError if another live process holds the lock."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise UserError(f"{os.path.dirname(self.path)} is in use by process {pid} on {host}; wait for it "
                            "to finish, stop it, or use another workdir") from None
        holder = os.read(fd, 200).decode(errors="replace").split()
        if holder:
            _warn(f"taking over the lock of {os.path.dirname(self.path)} from process {holder[0]} on "
                  f"{holder[-1]}, which is no longer running")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: the lock is not held, and the caller says why
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody to take over from
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def live_holder(workdir: str) -> str | None:
    """"process PID on HOST" when a live process holds the workdir's lock (a run is training
    there), else None. Reads the lock file only: never creates, locks or changes it."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            holder = f.read(200).split()
    except OSError:
        return None
    if len(holder) != 2 or not holder[0].isdigit():
        return None  # empty: released
    pid, host = int(holder[0]), holder[1]
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # died without releasing it (kill -9)
        except PermissionError:
            pass
    return f"process {pid} on {host}"


def prepare(config: ml_collections.ConfigDict, workdir: str, state_bytes: int) -> Lock:
    """Creates and locks the workdir, refuses a different run in it, checks it is writable
    with room for the checkpoints, and writes config.json. Only process 0 locks.

    Returns:
      The held Lock (release it when the run ends).

    Raises:
      UserError: nothing on disk was changed (a workdir or lock file it created is removed).
    """
    existed = os.path.isdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise UserError(f"workdir {workdir} is not writable: {error.strerror or error}") from None
    lock = Lock(workdir)
    lock_existed = os.path.exists(lock.path)
    try:
        if jax.process_index() == 0:
            try:
                lock.acquire()
            except OSError as error:  # read-only file system, no permission, not a real directory
                if is_disk_full(error):
                    raise disk_full(f"the lock {lock.path}", workdir,
                                    space_needed(config, state_bytes)) from None
                raise UserError(f"workdir {workdir} is not writable: {error.strerror or error}") from None
        _check(config, workdir, state_bytes)
        if config.overwrite:
            for name in ("checkpoints", "corrupt_checkpoints", "tensorboard", "report"):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
            if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
                os.remove(os.path.join(workdir, "metrics.jsonl"))
        write_config(config, workdir, space_needed(config, state_bytes))
    except BaseException:
        lock.release()
        # Refused: leave the disk as it was (no new lock file, no new empty workdir).
        if not lock_existed and os.path.exists(lock.path):
            os.remove(lock.path)
        if not existed and os.path.isdir(workdir) and not os.listdir(workdir):
            os.rmdir(workdir)
        raise
    return lock


def _check(config: ml_collections.ConfigDict, workdir: str, state_bytes: int) -> None:
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path) and not config.overwrite:
        try:
            with open(config_path) as f:
                old = json.load(f)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {config_path} ({error}); move it away or set --config.overwrite=True") from None
        if not isinstance(old, dict) or not all(isinstance(k, str) for k in old):
            raise UserError(f"{config_path} holds {json_kind(old)}, not the JSON object of dotted keys a run "
                            "writes; move it away or set --config.overwrite=True")
        new = flatten(config)
        differ = {k: (old.get(k), new.get(k)) for k in _identity(old) | _identity(new) if old.get(k) != new.get(k)}
        if differ:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(differ.items()))
            raise UserError(f"{workdir} holds a different run ({shown}); use a new workdir or "
                            "--config.overwrite=True to start over")
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"workdir {workdir} is not writable")
    needed = space_needed(config, state_bytes)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise UserError(f"not enough disk space in {workdir}: {free / 2**20:.0f} MiB free, checkpoints need "
                        f"about {needed / 2**20:.0f} MiB")


class SignalFlag:
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


# ---------------------------------------------------------------------------------------
# Reading a run back: config.json, saved steps, which checkpoint, its bookkeeping.

CHECKPOINT_CHOICES = ("best", "latest")


def read_flat(workdir: str) -> dict[str, Any]:
    """config.json as written by `write_config`: {"model.name": ..., "train.batch_size": ...}.

    Raises:
      UserError: no workdir, no or unreadable config.json.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise UserError(f"no run in {workdir} (no such directory)")
    if not os.path.isfile(path):
        raise UserError(f"no run in {workdir} (config.json missing)")
    try:
        with open(path) as f:
            flat = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(flat, dict):
        raise UserError(f"{path} is not a JSON object of dotted keys")
    return flat


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The ConfigDict a run was trained with, rebuilt from `workdir/config.json`.

    config.json holds the config flattened to dotted keys, tuples stored as JSON lists; this
    starts from `config.default_config()` and sets every key, turning lists back into tuples
    where the default is a tuple. Keys the defaults lack (a newer or older schema) are added
    as they are, so nothing the run recorded is dropped.

    Raises:
      UserError: no workdir, no or unreadable config.json, or a value of the wrong type.
    """
    path = os.path.join(workdir, "config.json")
    flat = read_flat(workdir)
    config = config_lib.default_config()
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = config
        try:
            for parent in parents:
                if parent not in node:
                    node[parent] = ml_collections.ConfigDict()
                node = node[parent]
            if isinstance(node.get(leaf), tuple) and isinstance(value, list):
                value = tuple(value)
            node[leaf] = value
        except (TypeError, ValueError, AttributeError, KeyError) as error:
            raise UserError(f"{path}: cannot set {key}={value!r}: {str(error).splitlines()[0]}") from None
    return config


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def saved_steps(workdir: str) -> list[int]:
    """Steps on disk, ascending, without creating anything (Orbax's manager would make the
    folder): the one listing of a run's checkpoints."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def check_checkpoint(workdir: str, which: str | int) -> list[int]:
    """The saved steps, when `which` (as `parse_checkpoint` returns it) can be loaded.

    Raises:
      UserError: no checkpoint at all, or the step asked for is not on disk.
    """
    saved = saved_steps(workdir)
    if not saved:
        raise UserError(f"no checkpoints in {checkpoint_dir(workdir)}: the run has not saved one yet")
    if isinstance(which, int) and which not in saved:
        raise UserError(f"no checkpoint at step {which} in {checkpoint_dir(workdir)}; have {saved}")
    return saved


def parse_checkpoint(checkpoint: str | int) -> str | int:
    """"best", "latest" or a step number (int).

    Raises:
      UserError: anything else.
    """
    text = str(checkpoint).strip()
    if text in CHECKPOINT_CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise UserError(f"--checkpoint must be best, latest or a step number, got {checkpoint!r}")


def choose_checkpoint(checkpoints, which: str | int) -> tuple[int | None, str | None]:
    """The step to restore (None: the newest readable) and a note when "best" falls back.

    The one rule for "best": the best step recorded in the newest readable checkpoint's
    metadata, if that step is still on disk; otherwise the latest, with a note saying why.

    Args:
      checkpoints: the run's `checkpoint.Checkpoints`.
      which: as `parse_checkpoint` returns it.
    """
    if not isinstance(which, str):
        return which, None
    if which == "latest":
        return None, None
    steps = sorted(checkpoints.steps(), reverse=True)
    meta = next((m for m in (checkpoints.read_meta(s) for s in steps) if m is not None), None)
    best = RunMeta.from_json(meta).best_step
    if best is None:
        return None, "no best step recorded (the run has not evaluated yet); using the latest checkpoint"
    if int(best) not in steps:
        return None, (f"the best step {best} is no longer on disk (have {sorted(steps)}); "
                      "using the latest checkpoint")
    return int(best), None


@dataclasses.dataclass
class RunMeta:
    """What a checkpoint records about its run besides the arrays (its JSON `meta` item).

    Attributes:
      step: the checkpoint's step.
      best_error, best_step: the lowest error of the watched split so far, and where.
      evals_since_best: evaluations since then (early stopping's patience).
      stopped_early: the step early stopping ended the run at, if it did.
      data_state: the input pipeline's position (grain's iterator state; None on device).
      normalization: {"mean", "std"} the inputs were normalised with (lists).
      image_shape: the model's input shape [H, W, C].
      imported_from: {"file", "format", "sha256"} of imported weights.
    """

    step: int = 0
    best_error: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: int | None = None
    data_state: Any = None
    normalization: dict | None = None
    image_shape: list[int] | None = None
    imported_from: dict | None = None

    @classmethod
    def from_json(cls, saved: dict | None) -> RunMeta:
        """From a checkpoint's meta; keys of another version of this class are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (saved or {}).items() if k in names})

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["imported_from"] is None:  # only imported runs say where they came from
            del out["imported_from"]
        return out
