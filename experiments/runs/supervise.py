"""The one way experiments run child processes: output to a log, signals passed on, deadlines.

A `Supervisor` holds any number of children at once. While it is active (a `with` block),
SIGTERM and SIGINT to the experiment are passed to every child once, as SIGTERM (a training
run then writes its checkpoint and exits 3; a second signal would make it exit at once), and
`stop_signal` tells the caller to start nothing new. Each child has a session of its own, so a
Ctrl-C in the terminal reaches it once, from here, not twice.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import IO


@dataclasses.dataclass
class Child:
    """One supervised process.

    Attributes:
      key: what the caller calls it.
      process: the running process.
      term_at: when it gets SIGTERM (time.time(); None: never by time).
      kill_at: when it is killed (None: never).
      grace_s: after a SIGTERM, the time it has before a kill.
      started, ended: wall-clock times of its start and exit.
      stopped: whether it was sent SIGTERM (by time or by a signal to the experiment).
    """

    key: str
    process: subprocess.Popen
    term_at: float | None
    kill_at: float | None
    grace_s: float
    log: IO | None
    started: float
    ended: float | None = None
    stopped: bool = False

    @property
    def code(self) -> int | None:
        return self.process.returncode

    @property
    def seconds(self) -> float:
        return (self.ended or time.time()) - self.started


class Supervisor:
    """Starts, watches and stops child processes; see the module docstring."""

    def __init__(self, cwd: str | None = None, stop_when: Callable[[], bool] | None = None):
        """`stop_when`: polled; once true, every child gets its SIGTERM (an outer loop's stop)."""
        self.cwd = cwd
        self.stop_when = stop_when
        self.children: dict[str, Child] = {}
        self.stop_signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> Supervisor:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        try:
            for child in list(self.children.values()):  # never leave a child behind
                if child.code is None:
                    self._terminate(child)
            deadline = time.time() + max((c.grace_s for c in self.children.values()), default=0)
            for child in self.children.values():
                try:
                    child.process.wait(timeout=max(deadline - time.time(), 0.1))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
                self._close(child)
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        for child in self.children.values():
            if child.code is None:
                self._terminate(child)
        previous = self._previous.get(signum)
        # An outer loop (the device suite) learns of it too; a handler that would raise
        # (gpu_share's, for the moments no supervisor runs) is not called: the children's
        # orderly exit is what follows.
        if callable(previous) and previous is not signal.default_int_handler and getattr(previous, "chain", True):
            previous(signum, frame)

    def _terminate(self, child: Child) -> None:
        if not child.stopped:
            child.stopped = True
            child.process.send_signal(signal.SIGTERM)
            now = time.time()
            child.kill_at = min(child.kill_at or now + child.grace_s, now + child.grace_s)

    def _close(self, child: Child) -> None:
        if child.ended is None:
            child.ended = time.time()
            if child.log:
                child.log.write(f"# exit {child.code} at {child.ended:.3f} after {child.seconds:.1f} s\n")
                child.log.close()

    def start(self, key: str, command: Sequence[str], log_path: str | None = None, env: dict | None = None,
              term_at: float | None = None, kill_at: float | None = None, grace_s: float = 30.0) -> Child:
        """Starts `command` (output appended to `log_path`, or this process's when None).

        The log gets a first line `# start <time.time()> $ command` and a last one
        `# exit <code> at <time>`, so lifetimes can be read back from it.
        """
        log = open(log_path, "a") if log_path else None
        started = time.time()
        if log:
            log.write(f"# start {started:.3f} $ {shlex.join(command)}\n")
            log.flush()
        process = subprocess.Popen(list(command), cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT if log else None,
                                   env=dict(os.environ, **(env or {})), start_new_session=True)
        child = Child(key, process, term_at, kill_at, grace_s, log, started)
        self.children[key] = child
        if self.stop_signal:  # a signal arrived while it was being started
            self._terminate(child)
        return child

    def poll(self) -> list[Child]:
        """Applies the deadlines; returns the children that exited since the last call."""
        ended = []
        now = time.time()
        if self.stop_when is not None and self.stop_when():
            for child in self.children.values():
                if child.ended is None:
                    self._terminate(child)
        for child in self.children.values():
            if child.ended is not None:
                continue
            if child.process.poll() is not None:
                self._close(child)
                ended.append(child)
            elif child.kill_at is not None and now >= child.kill_at:
                child.process.kill()
                child.process.wait()
                self._close(child)
                ended.append(child)
            elif child.term_at is not None and now >= child.term_at:
                self._terminate(child)
        return ended

    def running(self) -> list[Child]:
        return [c for c in self.children.values() if c.ended is None]

    def wait(self, child: Child, watch: Callable[[], None] | None = None, interval: float = 0.05) -> Child:
        """Polls until `child` exits, calling `watch` in between."""
        while child.ended is None:
            if watch:
                watch()
            self.poll()
            if child.ended is None:
                time.sleep(interval)
        if watch:
            watch()
        return child


def run(command: Sequence[str], log_path: str | None = None, env: dict | None = None, cwd: str | None = None,
        term_at: float | None = None, kill_at: float | None = None, grace_s: float = 30.0,
        watch: Callable[[], None] | None = None, stop_when: Callable[[], bool] | None = None) -> Child:
    """One supervised child, start to exit (signals to this process are passed on)."""
    with Supervisor(cwd, stop_when) as supervisor:
        return supervisor.wait(supervisor.start("child", command, log_path, env, term_at, kill_at, grace_s), watch)
