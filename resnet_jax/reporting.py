"""What a run writes as it goes: metrics.jsonl, TensorBoard events, a progress bar.

Only process 0 writes (multi-host runs share one workdir). TensorBoard files come from
tensorboardX, so nothing here imports TensorFlow.
"""

import json
import os
import sys
import time

import jax
import tqdm


class Reporter:
    """Metric records to `workdir/metrics.jsonl` and TensorBoard, plus a progress bar."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.start_time = time.time()
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.bar = tqdm.tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
            disable=not progress, file=sys.stderr, mininterval=1.0,
        )

    def write(self, record: dict) -> None:
        """Writes one record: {"step": int, "split": str, <metric>: float, ...}."""
        if not self.enabled:
            return
        record = {k: (float(v) if not isinstance(v, (str, int)) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in record.items():
            if name not in ("step", "split"):
                self.tensorboard.add_scalar(f"{record['split']}/{name}", value, record["step"])
        self.tensorboard.flush()
        if record["split"] == "train":
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", err=f"{100 * record['error']:.1f}%", refresh=False)

    def advance_to(self, step: int) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)

    def print(self, line: str) -> None:
        """A line on stdout that does not tear the progress bar."""
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl` (an empty list when there are none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
