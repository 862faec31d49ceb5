"""Errors a user can fix (config, paths, splits, checkpoints, a full disk): one line, exit code 2."""

import errno
import shutil

USER_ERROR_EXIT = 2
PREEMPTED_EXIT = 3  # SIGTERM/SIGINT: a checkpoint was written, the same command resumes
NONFINITE_EXIT = 4  # NaN/inf loss: stopped, the last good checkpoint is untouched


class UserError(Exception):
    """Something the user can fix. The entry points print `error: <message>` and exit 2."""


class Preempted(Exception):
    """SIGTERM/SIGINT: a checkpoint was written; the same command resumes (exit 3)."""


class NonFinite(Exception):
    """The loss or gradient became NaN/inf; the last good checkpoint is untouched (exit 4)."""


# ---------------------------------------------------------------------------------------
# Storage that fills up, and files whose JSON is of the wrong kind: the messages they get.

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# TensorStore (under Orbax) reports a full disk as a ValueError or RuntimeError whose text
# carries the status code, e.g. 'RESOURCE_EXHAUSTED: Error opening "zarr" driver: ...'.
_DISK_FULL_TEXT = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) says the disk or the quota is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFull(UserError):
    """A write failed for lack of space; exit 2. What was complete before stays intact."""


def disk_full(what: str, directory: str, needed_bytes: int | None = None) -> DiskFull:
    """The error for a write of `what` in `directory` that found the disk full: how much is
    free there and, if known, how much the run needs."""
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    need = f", the run needs about {needed_bytes / 2**20:,.1f} MiB" if needed_bytes else ""
    return DiskFull(f"no space left on device: cannot write {what} ({free} in {directory}{need}); free some "
                    "space and run the same command again to resume from the last complete checkpoint")


def json_kind(value: object) -> str:
    """What a parsed JSON value is, for messages: "an array", "a string", ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else f"a {type(value).__name__}"
