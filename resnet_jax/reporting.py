"""What a run writes as it goes: metrics.jsonl, TensorBoard events, and progress a person reads.

On a terminal a tqdm bar shows progress and each evaluation prints one line above it. Off a
terminal (a SLURM or nohup log, CI) or with `train.progress=False` there is no bar (its
carriage returns would run together into one unreadable line); instead one plain line per
`log_every` steps and one per evaluation:

    step 12,800/64,000 (20 %)  loss 0.532  train err 18.2 %  lr 0.1  3,410 img/s  ETA 14 min
    eval step 12,800: test err 9.81 % (top-5 0.42 %), best 9.81 % @ 12,800
    eval step 12,800: test err 9.81 % (top-5 0.42 %), EMA 9.12 %, best 9.81 % @ 12,800   (train.ema_decay)

Only process 0 writes or prints (multi-host runs share one workdir). TensorBoard files come
from tensorboardX, so nothing here imports TensorFlow.
"""

import contextlib
import json
import os
import sys
import time

import jax
import tqdm

from resnet_jax.errors import UserError, disk_full, is_disk_full, json_kind


def on_terminal() -> bool:
    """Whether a person is watching: both streams are a terminal (the bar goes to stderr,
    the lines to stdout, and a log file must get neither carriage returns nor a bar)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Reporter:
    """Metric records to `workdir/metrics.jsonl` and TensorBoard, plus progress on stdout."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool = True,
                 needed_bytes: int | None = None):
        """Opens the writers (process 0 only).

        Args:
          workdir: the run's directory; metrics.jsonl and tensorboard/ go there.
          total_steps: the step the run ends at (for the percentage and the ETA).
          start_step: the step it starts or resumes at.
          progress: False forces plain lines even on a terminal (`train.progress`).
          needed_bytes: what the run needs on disk, for the message when the disk is full.

        Raises:
          UserError: a writer cannot be opened (a full disk: DiskFull).
        """
        self.workdir, self.needed_bytes = workdir, needed_bytes
        self.enabled = jax.process_index() == 0
        self.start_time = time.time()
        self.total_steps, self.start_step, self.step = total_steps, start_step, start_step
        self.plain = not (progress and on_terminal())
        if not self.enabled:
            return
        self.jsonl = self.events = None
        with self._writing("metrics.jsonl"):
            self.jsonl = _open_for_append(os.path.join(workdir, "metrics.jsonl"))
        with self._writing("tensorboard/"):
            self.events = _Events(os.path.join(workdir, "tensorboard"))
        self.bar = tqdm.tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
            disable=self.plain, file=sys.stderr, mininterval=1.0,
        )

    def started(self, workdir: str, checkpoint_dir: str) -> None:
        """One line saying where everything goes and how to watch it."""
        self.print(f"writing to {workdir} (metrics.jsonl, tensorboard/), checkpoints in {checkpoint_dir}; "
                   f"watch with: tensorboard --logdir {workdir}")

    def write(self, record: dict) -> None:
        """Writes one record, {"step": int, "split": str, <metric>: float, ...}, to metrics.jsonl
        and TensorBoard; a train record also updates the bar, or prints its plain line."""
        if not self.enabled:
            return
        record = self._record(record)
        if record["split"] != "train":
            return
        if self.plain:
            self.print(self._train_line(record))
        else:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", err=f"{100 * record['error']:.1f}%", refresh=False)

    def evaluated(self, step: int, results: dict[str, dict], best_step: int | None, best_error: float | None,
                  watched: str) -> None:
        """Records one evaluation (one record per split) and prints its line.

        Args:
          step: the step evaluated.
          results: {split: {"loss", "error", "top5_error", "examples"}}, plus "ema_loss",
            "ema_error", "ema_top5_error" for a run with a weight EMA; "examples" goes to
            metrics.jsonl only (experiments read it to size their error bars).
          best_step: the step of the best `watched` error so far (None before any).
          best_error: that error.
          watched: the split whose error decides the best checkpoint.
        """
        if not self.enabled:
            return
        for name, result in results.items():
            self._record({"step": step, "split": name, **result})
        parts = []
        for name, result in results.items():
            part = f"{name} err {_percent(result['error'])}"
            if "top5_error" in result:
                part += f" (top-5 {_percent(result['top5_error'])})"
            if "ema_error" in result:  # the weight EMA's, evaluated beside the weights
                part += f", EMA {_percent(result['ema_error'])}"
            parts.append(part)
        if best_error is not None:
            # With several splits, say which one the best is on.
            label = f"best {watched}" if len(results) > 1 else "best"
            parts.append(f"{label} {_percent(best_error)} @ {best_step:,}")
        self.print(f"eval step {step:,}: " + ", ".join(parts))

    def advance_to(self, step: int) -> None:
        """The run has reached `step`."""
        if self.enabled:
            self.bar.update(step - self.step)
        self.step = step

    def print(self, line: str) -> None:
        """A line on stdout that does not tear the progress bar."""
        if not self.enabled:
            return
        if self.plain:
            print(line, flush=True)
        else:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self, quiet: bool = False) -> None:
        """Closes the writers, every one even when one fails.

        Args:
          quiet: another error is on its way out: a failure here (the same full disk,
            most likely) is dropped rather than replacing it.

        Raises:
          UserError: (unless `quiet`) a writer could not write what it held.
        """
        if not self.enabled:
            return
        self.bar.close()
        failed = None
        for what, writer in (("metrics.jsonl", self.jsonl), ("tensorboard/", self.events)):
            try:
                with self._writing(what):
                    if writer is not None:
                        writer.close()
            except UserError as error:
                failed = failed or error
        self.jsonl = self.events = None
        if failed is not None and not quiet:
            raise failed

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Turns a failed write of `what` into one error: a full disk says how much is free."""
        try:
            yield
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(what, self.workdir, self.needed_bytes) from None
            raise UserError(f"cannot write {os.path.join(self.workdir, what)}: {error.strerror or error}") from None

    def _record(self, record: dict) -> dict:
        """Appends `record` to metrics.jsonl and TensorBoard; returns it with plain floats."""
        record = {k: (float(v) if not isinstance(v, (str, int)) else v) for k, v in record.items()}
        with self._writing("metrics.jsonl"):
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        with self._writing("tensorboard/"):
            for name, value in record.items():
                if name not in ("step", "split", "examples"):  # examples: how many images, not a metric
                    self.events.add_scalar(f"{record['split']}/{name}", value, record["step"])
            self.events.flush()
        return record

    def _train_line(self, record: dict) -> str:
        step, total = record["step"], self.total_steps
        parts = [f"step {step:,}/{total:,} ({100 * step / max(total, 1):.0f} %)"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.3f}")
        if "error" in record:
            parts.append(f"train err {100 * record['error']:.1f} %")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.3g}")
        if "images_per_sec" in record:
            parts.append(f"{record['images_per_sec']:,.0f} img/s")
        done = step - self.start_step
        if done > 0 and step < total:
            # Wall-clock average since the start: it includes evaluations and checkpoints,
            # which the rest of the run will pay for too.
            parts.append(f"ETA {_duration((time.time() - self.start_time) / done * (total - step))}")
        return "  ".join(parts)


class _Events:
    """TensorBoard scalars, written in the calling thread: tensorboardX's EventsWriter without
    SummaryWriter's background thread, so a failed write (a full disk) is an exception here
    rather than a traceback from that thread and a closed handle later."""

    def __init__(self, logdir: str):
        # protobuf and more: only when events are written
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        self.event, self.scalar = event_pb2.Event, scalar
        os.makedirs(logdir, exist_ok=True)
        self.writer = EventsWriter(os.path.join(logdir, "events"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.write_event(self.event(summary=self.scalar(tag, value), step=step, wall_time=time.time()))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _percent(error: float) -> str:
    return f"{100 * error:.2f} %"


def _duration(seconds: float) -> str:
    """45 s, 14 min, 2.3 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl` (an empty list when there are none).

    A last line without its newline (a run killed while writing it) is left out.

    Raises:
      UserError: a line that is not JSON, or not an object with an integer "step" and a
        string "split" (the records the trainer writes); the message names the line.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines):  # no newline after it: cut short by a kill, not yet a record
                break
            raise UserError(f"{path} line {number} is not JSON ({error}); delete that line (the trainer "
                            "appends complete lines only)") from None
        if not (isinstance(record, dict) and type(record.get("step")) is int and isinstance(record.get("split"), str)):
            raise UserError(f"{path} line {number} holds {json_kind(record)}, not a metrics record (an object with "
                            'an integer "step" and a string "split"); delete that line')
        records.append(record)
    return records


def _open_for_append(path: str):
    """metrics.jsonl opened to append, a last line cut short by a kill removed first (so
    the next record starts a line of its own)."""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a")
