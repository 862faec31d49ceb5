"""Errors a user can fix (config, paths, splits, checkpoints): one line, exit code 2."""

USER_ERROR_EXIT = 2
PREEMPTED_EXIT = 3  # SIGTERM/SIGINT: a checkpoint was written, the same command resumes
NONFINITE_EXIT = 4  # NaN/inf loss: stopped, the last good checkpoint is untouched


class UserError(Exception):
    """Something the user can fix. The entry points print `error: <message>` and exit 2."""


class Preempted(Exception):
    """SIGTERM/SIGINT: a checkpoint was written; the same command resumes (exit 3)."""


class NonFinite(Exception):
    """The loss or gradient became NaN/inf; the last good checkpoint is untouched (exit 4)."""
