"""What the training experiments share: runs as config variants, run-or-skip, results, noise.

An experiment is a list of `Run`s, each a `configs/cifar.py` variant plus `--config.x=y`
overrides, i.e. exactly one `python -m resnet_jax.main` command (`Run.command`), which the
experiment prints beside every result so that any cell of its tables can be reproduced
alone. `run_or_skip` trains one in its own workdir through `train_and_evaluate` (or, when
it needs another device count than this process has, through that very command in a
subprocess), skips it when its `done.json` says it finished, and lets an interrupted one
resume. `result_row` turns a finished run into a results.json row; `compare` says whether
two groups of runs differ by more than their noise.

Nothing heavy is imported at module level, so bad flags fail before JAX loads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from resnet_jax.errors import NONFINITE_EXIT, PREEMPTED_EXIT, UserError, json_kind

CONFIG_FILE = "configs/cifar.py"  # resolves to the installed recipe from any directory
MAIN = "python -m resnet_jax.main"


# ---------------------------------------------------------------------------------------
# Flags.


def define_flags(flag_values: flags.FlagValues, schedules: Sequence[str], default_schedule: str = "paper") -> None:
    """The flags every training experiment has: --workdir, --schedule, --data, --seeds."""
    flags.DEFINE_string("workdir", None, "Experiment folder: one workdir per run, tables, figures, results.json.",
                        flag_values=flag_values)
    flags.DEFINE_enum("schedule", default_schedule, list(schedules),
                      "A schedule variant of configs/cifar.py (`resnet-jax configs` describes them).",
                      flag_values=flag_values)
    flags.DEFINE_string("data", None, "tfds | npz:PATH | synthetic (default: the schedule's; synthetic for smoke).",
                        flag_values=flag_values)
    flags.DEFINE_integer("seeds", 1, "Seeds per configuration: 0 .. N-1.", lower_bound=1, flag_values=flag_values)


def parse_data(spec: str | None) -> tuple[str, dict]:
    """--data -> (source option of the variant or "", overrides): "npz:PATH" ->
    ("npz", {"data.path": absolute PATH}); None -> ("", {}) (the schedule's source).

    Raises:
      UserError: an unknown source or a missing file.
    """
    if not spec:
        return "", {}
    kind, _, path = spec.partition(":")
    if kind == "npz":
        if not path:
            raise UserError("--data=npz needs a file: --data=npz:/path/to/cifar10.npz")
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise UserError(f"--data: file not found: {path}")
        return "npz", {"data.path": path}
    if kind in ("tfds", "synthetic") and not path:
        return kind, {}
    raise UserError(f"--data={spec!r}: use tfds, synthetic or npz:PATH")


def parse_depths(values: Sequence[str] | None, default: Sequence[int], flag: str = "--depths") -> list[int]:
    """["20", "56"] -> [20, 56], sorted, without repeats; each a CIFAR depth 6n+2 >= 8."""
    if not values:
        return sorted(default)
    depths = set()
    for item in values:
        item = str(item).strip()
        if not item.isdigit() or int(item) < 8 or (int(item) - 2) % 6:
            raise UserError(f"{flag}: {item!r} is not a CIFAR depth 6n+2 (8, 14, 20, ..., 56, ..., 110, ..., 1202)")
        depths.add(int(item))
    return sorted(depths)


# ---------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of an experiment: one `python -m resnet_jax.main` command.

    Attributes:
      name: its workdir's name inside the experiment's folder (e.g. "plain20_seed0").
      variant: the configs/cifar.py variant, e.g. "plain20,short,npz".
      overrides: config fields set on top, {"data.path": ..., "train.seed": 1}.
      devices: the device count it needs (0: whatever this process has); a CPU process
        with another count runs it as a subprocess with that many simulated devices.
      info: what the experiment wants in its results row ({"type": "plain", "depth": 20}).
    """

    name: str
    variant: str
    overrides: tuple[tuple[str, Any], ...] = ()
    devices: int = 0
    info: tuple[tuple[str, Any], ...] = ()

    def args(self, workdir: str) -> list[str]:
        """resnet_jax.main's flags for this run in `workdir`."""
        return ([f"--config={CONFIG_FILE}:{self.variant}"]
                + [f"--config.{key}={value}" for key, value in self.overrides] + [f"--workdir={workdir}"])

    def env(self) -> dict[str, str]:
        """Environment variables the command needs (the simulated device count)."""
        if not self.devices:
            return {}
        flags_now = os.environ.get("XLA_FLAGS", "")
        return {"XLA_FLAGS": f"{flags_now} --xla_force_host_platform_device_count={self.devices}".strip()}

    def command(self, workdir: str) -> str:
        """The shell command that trains exactly this run."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        return " ".join(filter(None, [env, MAIN, *map(shlex.quote, self.args(workdir))]))

    def config(self):
        """The ConfigDict resnet_jax.main builds from `args` (the same parser)."""
        from resnet_jax import cli

        return cli.config_from_args(self.args(""))


def make_run(name: str, variant: str, overrides: dict | None = None, devices: int = 0, **info: Any) -> Run:
    return Run(name, variant, tuple((overrides or {}).items()), devices, tuple(info.items()))


# What a done.json must hold to say a run finished (result_row reads these).
DONE_FIELDS = {"name": str, "step": int, "total_steps": int, "results": dict}


def run_or_skip(run: Run, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Trains `run` in `workdir` unless its done.json says it finished.

    Returns:
      The done record: {"name", "step", "total_steps", "results" ({split: {"loss",
      "error", "top5_error", "examples"}}), "minutes", "finished", "command"}; or
      {"name", "failed": message} for a run that diverged (failed.json; delete it to retry).

    Raises:
      UserError / train.Preempted: from the run (a subprocess's exit 2 / 3 likewise).
    """
    done_path, failed_path = os.path.join(workdir, "done.json"), os.path.join(workdir, "failed.json")
    config = run.config()
    total = config.train.total_steps
    done = read_json(done_path, DONE_FIELDS)
    if done and done.get("step") == total:
        log(f"{run.name}: finished earlier (step {total}), skipping")
        return done
    failed = read_json(failed_path, {"failed": str})
    if failed:
        log(f"{run.name}: diverged earlier ({failed['failed']}); delete {failed_path} to retry")
        return failed
    saved = os.path.join(workdir, "checkpoints")
    resuming = os.path.isdir(saved) and any(name.isdigit() for name in os.listdir(saved))
    log(f"{run.name}: {'resuming' if resuming else 'training'}: {run.command(workdir)}")
    start = time.time()
    import jax

    from resnet_jax import train

    try:
        if run.devices and run.devices != jax.device_count():
            step, results = _subprocess(run, workdir)
        else:
            result = train.train_and_evaluate(config, workdir)
            step, results = result["step"], {k: v for k, v in result.items() if k not in ("step", "best")}
    except train.NonFinite as error:
        failed = {"name": run.name, "failed": str(error)}
        write_json(failed_path, failed)
        log(f"{run.name}: diverged: {error}")
        return failed
    done = {"name": run.name, "step": step, "total_steps": total, "results": results,
            "minutes": (time.time() - start) / 60, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": run.command(workdir)}
    if step == total:  # early stopping would end short: not "done" then
        write_json(done_path, done)
    return done


def _subprocess(run: Run, workdir: str) -> tuple[int, dict]:
    """Runs `run.command` (another device count); returns its last step and evaluation."""
    from resnet_jax import train

    command = [sys.executable, "-m", "resnet_jax.main", *run.args(workdir)]
    # A session of its own, so a Ctrl-C reaches it once, from here, and not twice.
    child = subprocess.Popen(command, env=dict(os.environ, **run.env()), start_new_session=True)
    forward = lambda signum, _: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == PREEMPTED_EXIT:
        raise train.Preempted(f"{run.name} was stopped with a checkpoint; run the same command again to resume")
    if code == NONFINITE_EXIT:
        raise train.NonFinite(f"{run.name}: non-finite loss (see its output above)")
    if code:
        raise UserError(f"{run.name} exited with code {code} (its error is above): {run.command(workdir)}")
    return last_evaluation(workdir)


def last_evaluation(workdir: str) -> tuple[int, dict]:
    """(step, {split: record}) of the last evaluation in metrics.jsonl."""
    from resnet_jax import reporting

    evals = [r for r in reporting.read_metrics(workdir) if r.get("split") != "train" and "error" in r]
    step = max((r["step"] for r in evals), default=0)
    return step, {r["split"]: r for r in evals if r["step"] == step}


# ---------------------------------------------------------------------------------------
# Results.


def curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """split -> [(step, error)] from metrics.jsonl, sorted, one point per step (a resumed
    run may log a step twice: the later record wins)."""
    from resnet_jax import reporting

    by_split: dict[str, dict[int, float]] = {}
    for record in reporting.read_metrics(workdir):
        if "error" in record and "step" in record:
            by_split.setdefault(record["split"], {})[int(record["step"])] = float(record["error"])
    return {split: sorted(points.items()) for split, points in by_split.items()}


def final_train_error(train_curve: Sequence[tuple[int, float]], total_steps: int) -> float | None:
    """Mean running training error over the log windows of the last 10 % of the steps (the
    end of the paper's thin curves; one window alone is a few hundred images)."""
    if not train_curve:
        return None
    tail = [error for step, error in train_curve if step > 0.9 * total_steps] or [train_curve[-1][1]]
    return sum(tail) / len(tail)


def result_row(run: Run, done: dict, workdir: str) -> dict:
    """One results.json row: the run's command, its final errors (fractions), its curves
    ("steps", "train_error", "eval_steps", "test_error": what the figures draw)."""
    from resnet_jax.config import parse_splits

    config = run.config()
    eval_names = list(parse_splits(config.data.eval_splits))
    lines = curves(workdir)
    train_curve, total = lines.get("train", []), config.train.total_steps
    tail_windows = len([s for s, _ in train_curve if s > 0.9 * total]) or (1 if train_curve else 0)
    row = {"name": run.name, **dict(run.info), "seed": config.train.seed, "model": config.model.name,
           "variant": run.variant, "command": run.command(workdir),
           "steps": done.get("step"), "total_steps": total, "train_error": final_train_error(train_curve, total),
           "train_error_images": tail_windows * config.train.log_every * config.train.batch_size,
           "workdir": os.path.abspath(workdir), "minutes": done.get("minutes"), "finished": done.get("finished"),
           "failed": done.get("failed")}
    results = done.get("results") or {}
    for split in eval_names:
        row[f"{split}_error"] = results.get(split, {}).get("error")
        row[f"{split}_examples"] = results.get(split, {}).get("examples")
    row["eval_splits"], row["headline_split"] = eval_names, eval_names[0]
    row["test_error"] = row[f"{eval_names[0]}_error"]
    eval_curve = lines.get(eval_names[0], [])
    row["curves"] = {"steps": [s for s, _ in train_curve], "train_error": [e for _, e in train_curve],
                     "eval_steps": [s for s, _ in eval_curve], "test_error": [e for _, e in eval_curve]}
    return row


def figure_runs(rows: list[dict]) -> list[dict]:
    """Rows -> the dicts figures.degradation_png and figures.study_png draw (failed runs left out
    when any succeeded)."""
    ok = [r for r in rows if not r.get("failed")] or rows
    return [{**{k: v for k, v in r.items() if k != "curves"}, "skip": r.get("type") != "plain", **r["curves"]}
            for r in ok]


def save_results(path: str, rows: list[dict]) -> None:
    write_json(path, [{k: v for k, v in r.items() if k != "curves"} for r in rows])


# ---------------------------------------------------------------------------------------
# Noise.


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std, len(values)


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def binomial_se(p: float, n: float) -> float:
    """Standard error of an error rate measured on n images (sampling noise alone)."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def compare(label_a: str, a: list[dict], label_b: str, b: list[dict], key: str,
            examples_key: str) -> tuple[str, float, float]:
    """"b vs a: x points (noise ±y)" on the means over seeds of `key`; the noise is two
    standard errors of the difference: binomial on the images measured, plus the seeds' spread."""
    ma, sa, na = mean_std([r[key] for r in a])
    mb, sb, nb = mean_std([r[key] for r in b])
    ea = sum(r.get(examples_key) or 0 for r in a)
    eb = sum(r.get(examples_key) or 0 for r in b)
    noise = 2 * math.sqrt(binomial_se(ma, ea) ** 2 + binomial_se(mb, eb) ** 2
                          + (sa or 0) ** 2 / max(na, 1) + (sb or 0) ** 2 / max(nb, 1))
    diff = mb - ma
    return (f"{label_b} {pct(mb)} % vs {label_a} {pct(ma)} % ({100 * diff:+.2f} points, "
            f"noise ±{100 * noise:.2f})"), diff, noise


# ---------------------------------------------------------------------------------------
# Files and the record of how it ran.


def write_json(path: str, value: Any) -> None:
    """Atomic: a kill leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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


def check_experiment(workdir: str, identity: dict) -> None:
    """Refuses a workdir that holds the same experiment under another schedule or data
    (resuming would mix them); records `identity` otherwise."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "experiment.json")
    old = read_json(path)
    if old is not None:
        differ = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if differ:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
            raise UserError(f"{workdir} holds another experiment ({shown}); use a new --workdir")
    write_json(path, identity)


def command_line(module: str, argv: Sequence[str]) -> str:
    """How this experiment was launched, for its table."""
    return " ".join(["python -m", module, *map(shlex.quote, argv[1:])])


def machine() -> str:
    import jax

    devices = jax.devices()
    cpu = platform.processor() or platform.machine()
    try:
        load = ", load average %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{platform.node()}: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
            f"{os.cpu_count()} CPU cores ({cpu}){load}; jax {jax.__version__}, Python {platform.python_version()}")


def training_summary(rows: list[dict]) -> str:
    """Total wall time of the runs and when they finished (from their done.json, so a rerun
    that only rebuilds the report keeps the real numbers)."""
    finished = sorted(r["finished"] for r in rows if r.get("finished"))
    total = sum(r.get("minutes") or 0 for r in rows)
    text = f"{len(rows)} runs, {total:.1f} min of training in all (compilation, data loading and evaluations included)"
    return text + (f", finished {finished[0]} … {finished[-1]}" if finished else "")


def commands_section(rows: list[dict]) -> list[str]:
    """Markdown: the command that reproduces each run (and so each cell of the tables)."""
    out = ["## Commands", "", "Each run alone (the same command resumes it; another --workdir starts afresh):", ""]
    return out + [f"- `{r['name']}`: `{r['command']}`" for r in rows] + [""]
