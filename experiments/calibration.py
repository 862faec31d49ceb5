"""What a training run costs on this machine, before any data is needed: calibration.json.

    python -m experiments.device_suite --out=DIR --parts=calibrate [--tiny]

measures, with resnet_jax.main's own training loop on synthetic batches (bf16, batch 128):

- alone: resnet20 at 1, 8 and `LOG_EVERY // 5` steps per dispatch (a value that divides the
  log period), and resnet56 at 8; per run, the seconds beyond its steps (compilation, the
  evaluation, the final checkpoint) and a process's start-up (launch to a ready JAX backend);
- 2 and 4 runs at once (resnet20 and resnet56 alternately, each its own process, one shared
  compilation cache), without and, where `nvidia-cuda-mps-control` exists, with CUDA MPS;
  MPS "works" when every run under it finished.

It is sized for about 2 minutes on a GPU (most of it start-up and compilation; not yet timed on
one) and keeps to the suite's budget: a group that would start past it is skipped. The planner
(experiments.runs.planner) and `--concurrent=auto` read calibration.json. With --tiny: resnet8
on 16 px images at batch 16, 1 and 2 steps per dispatch, alone and 2 at once, on CPU in about
a minute: it checks the plumbing, and its numbers are CPU numbers.

Each measurement is this module in a child process:

    python -m experiments.calibration --model=resnet20 --dispatch=1,8,40 --json=FILE --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from absl import flags

from .runs import gpu_share, machine, records, supervise
from .runs.spec import make_run
from resnet_jax import cli

LOG_EVERY = 200
LAUNCHED = "CALIBRATION_LAUNCHED"  # the child's launch time, from its parent

FLAGS = flags.FlagValues()
flags.DEFINE_list("model", ["resnet20"], "CIFAR nets, one after another: the first at every --dispatch value, "
                  "the others at the first.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 128, "Batch size.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 32, "Synthetic image size.", flag_values=FLAGS)
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_list("dispatch", ["8"], "Steps per dispatch, one run each.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 1000, "Training steps of each run.", flag_values=FLAGS)
flags.DEFINE_integer("log_every", LOG_EVERY, "Log period (each log record is one timed window).", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Where the measurements go (JSON).", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Scratch folder for the runs.", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big the calibration is: the real one, or --tiny's plumbing check."""

    models: tuple[str, ...]
    batch: int
    image_size: int
    steps: int
    log_every: int
    dispatch: tuple[int, ...]  # the first is the one the concurrency rows use
    levels: tuple[int, ...]  # runs at once

    @classmethod
    def of(cls, tiny: bool) -> Sizes:
        if tiny:
            return cls(("resnet8",), 16, 16, 8, 4, (2, 1), (2,))
        return cls(("resnet20", "resnet56"), 128, 32, 1000, LOG_EVERY, (8, 1, LOG_EVERY // 5), (2, 4))


def measure(model: str, batch: int, image_size: int, dtype: str, dispatch: Sequence[int], steps: int, log_every: int,
            workdir: str) -> list[dict]:
    """Trains `model` on synthetic batches once per steps-per-dispatch value, in this process.

    Returns:
      [{"model", "steps_per_dispatch", "ms_per_step" (median over the log windows after the
      first), "overhead_s" (the run's wall time less its steps at that rate)}].
    """
    from resnet_jax import train  # after the flags: bad flags fail before JAX loads

    out = []
    for n in dispatch:
        config = make_run("calibration", f"{model},synthetic").config()  # the recipe, as resnet_jax.main builds it
        config.model.dtype = dtype
        config.data.image_size = image_size
        config.data.synthetic_examples = 4 * batch
        config.data.normalization = "none"
        t = config.train
        t.batch_size, t.eval_batch_size, t.total_steps, t.log_every = batch, batch, steps, log_every
        t.eval_every, t.checkpoint_every, t.keep_checkpoints = steps, steps, 1
        t.steps_per_dispatch, t.progress = n, False
        run_dir = os.path.join(workdir, f"{model}_spd{n}")
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.time()
        train.train_and_evaluate(config, run_dir)
        wall = time.time() - start
        rates = [r["images_per_sec"] for r in records.read_metrics(run_dir)
                 if r.get("split") == "train" and r.get("images_per_sec")]
        ms = 1e3 * batch / statistics.median(rates[1:] or rates)
        out.append({"model": model, "steps_per_dispatch": n, "ms_per_step": ms,
                    "overhead_s": max(wall - steps * ms / 1e3, 0.0)})
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def child_main(argv: Sequence[str]) -> None:
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        import jax

        jax.devices()  # start-up: launch to a ready backend
        startup = time.time() - float(os.environ.get(LAUNCHED, time.time()))
        dispatch = [int(d) for d in FLAGS.dispatch]
        rows = []
        for i, model in enumerate(FLAGS.model):
            rows += measure(model, FLAGS.batch, FLAGS.image_size, FLAGS.dtype, dispatch if i == 0 else dispatch[:1],
                            FLAGS.steps, FLAGS.log_every, FLAGS.workdir)
        records.write_json(FLAGS.json, {"startup_s": startup, "rows": rows})


def calibrate(out: str, tiny: bool, deadline: float, log: Callable[[str], None] = print,
              cwd: str | None = None) -> dict:
    """Runs the measurements (children, see the module docstring) and writes
    out/calibration.json; returns its content."""
    sizes = Sizes.of(tiny)
    scratch, logs = os.path.join(out, "calibration"), os.path.join(out, "logs")
    os.makedirs(scratch, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    start = time.time()
    info = machine.probe(cwd=cwd)

    def group(name: str, jobs: list[tuple[Sequence[str], Sequence[int]]],
              mps_env: dict | None = None) -> list[dict | None]:
        """`jobs` ((models, dispatch values)) at once; each one's measurements or None."""
        env = gpu_share.child_env(len(jobs), os.path.join(out, "jax_cache"))
        with supervise.Supervisor(cwd) as supervisor:
            children = []
            for i, (model, dispatch) in enumerate(jobs):
                path = os.path.join(scratch, f"{name}_{i}.json")
                if os.path.exists(path):
                    os.remove(path)
                command = [sys.executable, "-m", f"{__package__}.calibration", f"--model={','.join(model)}",
                           f"--batch={sizes.batch}", f"--image_size={sizes.image_size}",
                           f"--dispatch={','.join(map(str, dispatch))}", f"--steps={sizes.steps}",
                           f"--log_every={sizes.log_every}", f"--json={path}",
                           f"--workdir={os.path.join(scratch, f'{name}_{i}')}"]
                children.append((supervisor.start(f"{name}_{i}", command, os.path.join(logs, f"calibrate_{name}_{i}.log"),
                                                  {**env, **(mps_env or {}), LAUNCHED: repr(time.time())},
                                                  term_at=deadline, grace_s=2.0), path))
            for child, _ in children:
                supervisor.wait(child)
        return [records.read_json(path) if child.code == 0 else None for child, path in children]

    alone = group("alone", [(sizes.models, sizes.dispatch)])  # one process: one start-up for all of it
    found = [a for a in alone if a]
    dispatch_rows = [row for a in found for row in a["rows"]]
    main_spd = sizes.dispatch[0]
    at_main = {r["model"]: r for r in dispatch_rows if r["steps_per_dispatch"] == main_spd}
    concurrency = [{"k": 1, "mps": False, "ms_per_step": {m: r["ms_per_step"] for m, r in at_main.items()}}]
    mps = {"available": shutil.which(gpu_share.MPS_CONTROL) is not None, "works": None}
    for use_mps in ([False, True] if mps["available"] else [False]):
        for k in sizes.levels:
            if time.time() > deadline:
                break
            jobs = [((sizes.models[i % len(sizes.models)],), (main_spd,)) for i in range(k)]
            with gpu_share.mps(log, enabled=use_mps) as mps_env:
                if use_mps and not mps_env:
                    mps["works"] = False
                    break
                measured = group(f"k{k}{'_mps' if use_mps else ''}", jobs, mps_env)
            if use_mps:
                mps["works"] = all(measured) and mps["works"] is not False
            per_model: dict[str, list[float]] = {}
            for m in measured:
                for row in (m or {}).get("rows", []):
                    per_model.setdefault(row["model"], []).append(row["ms_per_step"])
            if per_model:
                concurrency.append({"k": k, "mps": use_mps,
                                    "ms_per_step": {m: statistics.median(v) for m, v in per_model.items()}})
    result = {"machine": info, "card": machine.card(info), "versions": info.get("versions", {}), "tiny": tiny,
              "batch": sizes.batch, "image_size": sizes.image_size, "dtype": "bfloat16", "steps": sizes.steps,
              "log_every": sizes.log_every, "steps_per_dispatch": main_spd, "mps": mps,
              "startup_s": statistics.median([a["startup_s"] for a in found]) if found else None,
              "overhead_s": {m: r["overhead_s"] for m, r in at_main.items()},
              "dispatch": dispatch_rows, "concurrency": concurrency, "seconds": time.time() - start}
    records.write_json(os.path.join(out, "calibration.json"), result)
    return result


if __name__ == "__main__":
    child_main(sys.argv)
