"""He et al. 2015, Fig. 6 / Table 6: plain vs residual nets on CIFAR-10 at several depths.

    python -m experiments.degradation --workdir=runs/degradation                      # paper
    python -m experiments.degradation --workdir=runs/degradation_short --schedule=short \
        --depths=20,56 --data=npz:/work/shared/data/cifar10/cifar10.npz
    python -m experiments.degradation --workdir=/tmp/deg_smoke --schedule=smoke    # < 1 min

Trains plain-d and ResNet-d for every depth d and seed through `train_and_evaluate`, one
workdir each (WORKDIR/plain20_seed0, WORKDIR/resnet20_seed0, ...). A run whose `done.json`
says it reached the schedule's last step is skipped; an interrupted run resumes from its
checkpoints (train_and_evaluate does that by itself), so the same command can be repeated
until everything is done. Then it writes WORKDIR/fig6.png (the Fig. 6 replica),
WORKDIR/table.md (ours beside the paper's, and whether degradation shows) and
WORKDIR/results.json (one row per run).

Schedules (see `SCHEDULES`):
  paper  the recipe: 64k steps of batch 128 on all 50k training images, lr 0.1 divided by
         10 at 32k and 48k. What the paper's published numbers are (a GPU job: hours).
  short  the same shape (lr drops at 50 % and 75 %) in 480 steps of batch 32 with lr 0.025
         (the linear scaling rule, 0.1 x 32/128), evaluated on the 1,000 byte-exact test
         images (npz) or test[:1000] (TFDS). Sized so that --depths=20,56 (4 runs) finishes
         in about 30 minutes on a shared 2-core CPU (measured: 0.22 s a ResNet-20 step,
         0.96 s a ResNet-56 step). It covers 31 % of one epoch: it shows how quickly each net
         starts to train, not the paper's converged errors.
  smoke  end to end in well under a minute on a CPU: 8 steps of batch 16 on 128 random
         16x16 images (or the first 512 npz images), depths 8 and 14 by default. For CI.

Expected (paper): ResNet test error falls with depth (8.75 % at 20 to 6.97 % at 56) while
plain nets get worse (Fig. 6: plain-56 has higher training *and* test error than plain-20).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# resnet_jax.errors imports nothing heavy, so bad flags still fail before jax loads.
from resnet_jax.errors import PREEMPTED_EXIT, USER_ERROR_EXIT  # noqa: E402

# He et al. 2015, Table 6 (CIFAR-10 test error, %, best of 5 runs for 110; "6.61 +- 0.16" is
# its mean). Plain nets have no table; DESIGN.md reads plain-20 ~9.5 % and plain-56 ~13.5 %
# off Fig. 6 (left). Depths without a number there are left blank rather than guessed.
PAPER_TEST_ERROR = {
    ("resnet", 20): (8.75, "Table 6"),
    ("resnet", 32): (7.51, "Table 6"),
    ("resnet", 44): (7.17, "Table 6"),
    ("resnet", 56): (6.97, "Table 6"),
    ("resnet", 110): (6.43, "Table 6 (best of 5; mean 6.61 ± 0.16)"),
    ("resnet", 1202): (7.93, "Table 6"),
    ("plain", 20): (9.5, "≈, read off Fig. 6"),
    ("plain", 56): (13.5, "≈, read off Fig. 6"),
}
PAPER_STEPS = 64_000  # the recipe's length: warm-up lengths scale with a shortened schedule


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and on what each run of an experiment trains (the rest is configs/cifar.py)."""

    name: str
    total_steps: int
    batch_size: int
    lr: float
    log_every: int
    eval_every: int
    checkpoint_every: int
    depths: tuple[int, ...]  # default --depths
    train_split: dict[str, str]  # data kind ("tfds", "npz", "synthetic") -> split
    eval_splits: dict[str, str]  # data kind -> name=split list; the first is the headline
    eval_batch_size: int
    default_data: str
    image_size: int = 32  # synthetic data only; real data has its own size
    synthetic_examples: int = 2048
    summary: str = ""


SCHEDULES = {
    "paper": Schedule(
        name="paper", total_steps=64_000, batch_size=128, lr=0.1, log_every=100, eval_every=1000,
        checkpoint_every=1000, depths=(20, 32, 44, 56),
        train_split={"tfds": "train", "npz": "train", "synthetic": "train"},
        eval_splits={"tfds": "test=test", "npz": "test=test,test_exact=test_exact", "synthetic": "test=test"},
        eval_batch_size=1000, default_data="tfds",
        summary="He et al.'s recipe: 64k steps of batch 128 on all 50k training images, lr 0.1 "
                "divided by 10 at 32k and 48k steps, SGD momentum 0.9, weight decay 1e-4, "
                "4-pixel pad + crop + flip",
    ),
    "short": Schedule(
        name="short", total_steps=480, batch_size=32, lr=0.025, log_every=10, eval_every=120,
        checkpoint_every=120, depths=(20, 56),
        train_split={"tfds": "train", "npz": "train", "synthetic": "train"},
        eval_splits={"tfds": "test1k=test[:1000]", "npz": "test_exact=test_exact", "synthetic": "test=test"},
        eval_batch_size=500, default_data="tfds",
        summary="the recipe's shape (lr divided by 10 at 50 % and 75 % of the steps) shrunk to "
                "480 steps of batch 32 (15,360 images, 31 % of one epoch) on all 50k training "
                "images, lr 0.025 by the linear scaling rule (0.1 x 32/128); evaluated on 1,000 "
                "test images only, to keep evaluations cheap on a CPU. It shows how fast each net "
                "starts to train, not the converged errors of the paper",
    ),
    "smoke": Schedule(
        name="smoke", total_steps=8, batch_size=16, lr=0.05, log_every=2, eval_every=4,
        checkpoint_every=4, depths=(8, 14),
        train_split={"tfds": "train[:512]", "npz": "train[:512]", "synthetic": "train"},
        eval_splits={"tfds": "test=test[:200]", "npz": "test_exact=test_exact[:200]", "synthetic": "test=test"},
        eval_batch_size=100, default_data="synthetic", image_size=16, synthetic_examples=128,
        summary="pipeline check only: 8 steps of batch 16 (random 16x16 images unless --data is "
                "given); the errors mean nothing",
    ),
}


class UsageError(Exception):
    """A bad flag: printed as one line, exit code 2 (raised before jax is imported)."""


# ---------------------------------------------------------------------------------------
# Flags and configs.


@dataclasses.dataclass(frozen=True)
class DataSpec:
    kind: str  # "tfds", "npz" or "synthetic"
    path: str = ""

    def __str__(self) -> str:
        return f"npz:{self.path}" if self.kind == "npz" else self.kind


def parse_data(spec: str | None, schedule: Schedule) -> DataSpec:
    """"tfds" | "npz:PATH" | "synthetic" (None: the schedule's default)."""
    spec = spec or schedule.default_data
    kind, _, path = spec.partition(":")
    if kind == "npz":
        if not path:
            raise UsageError("--data=npz needs a file: --data=npz:/path/to/cifar10.npz")
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise UsageError(f"--data: file not found: {path}")
        return DataSpec("npz", path)
    if kind in ("tfds", "synthetic") and not path:
        return DataSpec(kind)
    raise UsageError(f"--data={spec!r}: use tfds, synthetic or npz:PATH")


def parse_depths(text: str | None, schedule: Schedule, flag: str = "--depths") -> list[int]:
    """"20,56" -> [20, 56]; every depth must be a CIFAR depth 6n+2 >= 8."""
    if not text:
        return list(schedule.depths)
    depths = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 8 or (int(item) - 2) % 6:
            raise UsageError(f"{flag}: {item!r} is not a CIFAR depth 6n+2 (8, 14, 20, 26, 32, 38, 44, "
                             "50, 56, ..., 110, ..., 1202)")
        if int(item) not in depths:
            depths.append(int(item))
    return sorted(depths)


def steps_per_dispatch(schedule: Schedule) -> int:
    """Steps scanned per jitted call: 1 on CPU, where XLA runs the kernel-gradient
    convolutions inside a loop body ~30x slower than in a step dispatched alone (measured:
    ResNet-20, batch 32, 0.3 s vs 10 s a step); up to a log window on accelerators, where
    dispatch overhead dominates."""
    import jax

    return 1 if jax.default_backend() == "cpu" else math.gcd(schedule.log_every, 100)


def make_config(model: str, seed: int, schedule: Schedule, data: DataSpec, **model_overrides: Any):
    """configs/cifar.py's recipe for `model`, on `data`, for `schedule`."""
    from configs import cifar

    config = cifar.get_config(model)
    for key, value in model_overrides.items():
        config.model[key] = value
    config.data.source = data.kind
    config.data.path = data.path
    config.data.train_split = schedule.train_split[data.kind]
    config.data.eval_splits = schedule.eval_splits[data.kind]
    if data.kind == "synthetic":
        config.data.image_size = schedule.image_size
        config.data.synthetic_examples = schedule.synthetic_examples
    train = config.train
    train.seed = seed
    train.batch_size = schedule.batch_size
    train.eval_batch_size = schedule.eval_batch_size
    train.total_steps = schedule.total_steps
    train.log_every = schedule.log_every
    train.eval_every = schedule.eval_every
    train.checkpoint_every = schedule.checkpoint_every
    train.steps_per_dispatch = steps_per_dispatch(schedule)
    train.progress = sys.stderr.isatty()
    config.optim.lr = schedule.lr
    if config.optim.warmup_steps:  # ResNet-110+: 400 of 64k steps at lr 0.01, kept in proportion
        config.optim.warmup_steps = max(1, round(config.optim.warmup_steps * schedule.total_steps / PAPER_STEPS))
        config.optim.warmup_lr = config.optim.warmup_lr * schedule.lr / 0.1
    return config


# ---------------------------------------------------------------------------------------
# Runs: train, skip when finished, collect.


def _write_json(path: str, value: Any) -> None:
    """Atomic: a kill leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_experiment(workdir: str, identity: dict) -> None:
    """Refuses a workdir that holds the same experiment under another schedule or data
    (resuming would mix them); records `identity` otherwise."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "experiment.json")
    old = _read_json(path)
    if old is not None:
        differ = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if differ:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
            raise UsageError(f"{workdir} holds another experiment ({shown}); use a new --workdir")
    _write_json(path, identity)


def run_or_skip(name: str, config, workdir: str, log: Callable[[str], None]) -> dict:
    """Trains `config` in `workdir` unless its done.json says it finished.

    Returns:
      The done record: {"name", "step", "total_steps", "result" (train_and_evaluate's
      return), "minutes", "finished"}; or {"name", "failed": message} for a run that
      diverged (failed.json; delete it to retry).

    Raises:
      Preempted / UserError from train_and_evaluate.
    """
    done_path, failed_path = os.path.join(workdir, "done.json"), os.path.join(workdir, "failed.json")
    done = _read_json(done_path)
    total = config.train.total_steps
    if done and done.get("step") == total:
        log(f"{name}: finished earlier (step {total}), skipping")
        return done
    failed = _read_json(failed_path)
    if failed:
        log(f"{name}: diverged earlier ({failed['failed']}); delete {failed_path} to retry")
        return failed
    from resnet_jax import train

    resuming = os.path.isdir(os.path.join(workdir, "checkpoints"))
    log(f"{name}: {'resuming' if resuming else 'training'} ({total} steps) in {workdir}")
    start = time.time()
    try:
        result = train.train_and_evaluate(config, workdir)
    except train.NonFinite as error:
        failed = {"name": name, "failed": str(error)}
        _write_json(failed_path, failed)
        log(f"{name}: diverged: {error}")
        return failed
    done = {"name": name, "step": result["step"], "total_steps": total, "result": result,
            "minutes": (time.time() - start) / 60,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    if result["step"] == total:  # early stopping would end short: not "done" then
        _write_json(done_path, done)
    return done


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


def run_row(name: str, done: dict, workdir: str, config, extra: dict) -> dict:
    """One results.json row: what the run is, and its final errors (fractions)."""
    eval_names = list(_split_names(config.data.eval_splits))
    lines = curves(workdir)
    train_curve = lines.get("train", [])
    total = config.train.total_steps
    tail_windows = len([s for s, _ in train_curve if s > 0.9 * total]) or (1 if train_curve else 0)
    row = {"name": name, **extra, "seed": config.train.seed, "model": config.model.name,
           "steps": done.get("step"), "total_steps": total,
           "train_error": final_train_error(train_curve, total),
           "train_error_images": tail_windows * config.train.log_every * config.train.batch_size,
           "workdir": os.path.abspath(workdir), "minutes": done.get("minutes"), "finished": done.get("finished"),
           "failed": done.get("failed")}
    result = done.get("result") or {}
    for split in eval_names:
        row[f"{split}_error"] = result.get(split, {}).get("error")
        row[f"{split}_examples"] = result.get(split, {}).get("examples")
    row["headline_split"] = eval_names[0]
    row["test_error"] = row[f"{eval_names[0]}_error"]
    row["curves"] = {"train": train_curve, "eval": lines.get(eval_names[0], [])}
    return row


def _split_names(spec: str) -> list[str]:
    return [item.partition("=")[0].strip() for item in spec.split(",") if item.strip()]


# ---------------------------------------------------------------------------------------
# Report.


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


def compare(label_a: str, a: dict, label_b: str, b: dict, key: str, examples_key: str) -> tuple[str, float, float]:
    """"b is higher/lower than a by x points (noise +-y)": means over seeds of `key`;
    noise is two binomial standard errors of the difference (plus the seeds' spread)."""
    ma, sa, na = mean_std([r[key] for r in a])
    mb, sb, nb = mean_std([r[key] for r in b])
    ea = sum(r.get(examples_key) or 0 for r in a)
    eb = sum(r.get(examples_key) or 0 for r in b)
    noise = 2 * math.sqrt(binomial_se(ma, ea) ** 2 + binomial_se(mb, eb) ** 2
                          + (sa or 0) ** 2 / max(na, 1) + (sb or 0) ** 2 / max(nb, 1))
    diff = mb - ma
    return (f"{label_b} {pct(mb)} % vs {label_a} {pct(ma)} % ({100 * diff:+.2f} points, "
            f"noise ±{100 * noise:.2f})"), diff, noise


def findings(rows: list[dict], eval_split: str) -> list[str]:
    """Plain words on what the table shows: degradation or not, residual gains or not."""
    ok = [r for r in rows if r["train_error"] is not None and not r.get("failed")]
    lines = []
    for kind, family in (("plain", "plain"), ("resnet", "ResNet")):
        depths = sorted({r["depth"] for r in ok if r["type"] == kind})
        for shallow, deep in zip(depths, depths[1:]):
            a = [r for r in ok if r["type"] == kind and r["depth"] == shallow]
            b = [r for r in ok if r["type"] == kind and r["depth"] == deep]
            train_text, train_diff, train_noise = compare(f"{family}-{shallow}", a, f"{family}-{deep}", b,
                                                          "train_error", "train_error_images")
            test_text, test_diff, test_noise = compare(f"{family}-{shallow}", a, f"{family}-{deep}", b,
                                                       f"{eval_split}_error", f"{eval_split}_examples")
            if kind == "plain":
                if train_diff > train_noise:
                    verdict = "**degradation shows**: the deeper plain net has the higher training error"
                elif train_diff > 0:
                    verdict = ("**degradation not established**: the deeper plain net's training error is "
                               "higher, but within the noise")
                elif train_diff >= -train_noise:
                    verdict = ("**no degradation in this run**: the deeper plain net's training error is not "
                               "higher (the difference is within the noise)")
                else:
                    verdict = ("**no degradation in this run**: the deeper plain net has the *lower* "
                               "training error")
            else:
                if train_diff < -train_noise and test_diff < -test_noise:
                    verdict = "**the deeper ResNet is better** in training and test error"
                elif train_diff < 0 and test_diff < 0:
                    verdict = "the deeper ResNet is better in both, but within the noise"
                elif train_diff < 0 or test_diff < 0:
                    verdict = "**mixed**: the deeper ResNet is better in one of training/test error only"
                else:
                    verdict = "**the deeper ResNet does not improve** in this run"
            lines.append(f"- {family}-{shallow} → {family}-{deep}: {verdict}. Training error: {train_text}; "
                         f"{eval_split} error: {test_text}.")
    depths = sorted({r["depth"] for r in ok})
    for depth in depths:
        plain = [r for r in ok if r["type"] == "plain" and r["depth"] == depth]
        res = [r for r in ok if r["type"] == "resnet" and r["depth"] == depth]
        if plain and res:
            text, diff, noise = compare(f"plain-{depth}", plain, f"ResNet-{depth}", res, "train_error",
                                        "train_error_images")
            word = ("lower" if diff < -noise else "higher" if diff > noise else "about the same (within noise)")
            lines.append(f"- At depth {depth} the ResNet's training error is {word}: {text}.")
    for r in rows:
        if r.get("failed"):
            lines.append(f"- {r['name']} diverged: {r['failed']}")
    return lines


def write_table(path: str, rows: list[dict], schedule: Schedule, data: DataSpec, command: str,
                started: str, machine_line: str, minutes: float) -> str:
    eval_splits = _split_names(schedule.eval_splits[data.kind])
    eval_specs = schedule.eval_splits[data.kind]
    headline = eval_splits[0]
    out = ["# Degradation: plain vs residual nets on CIFAR-10 (He et al. 2015, Fig. 6 / Table 6)", ""]
    out += [f"- Schedule: `{schedule.name}` — {schedule.summary}.",
            f"- Data: `{data}`; training split `{schedule.train_split[data.kind]}`, evaluated on `{eval_specs}`.",
            f"- Date: {started}; wall time of this invocation {minutes:.1f} min (runs skipped as finished cost nothing).",
            f"- Training: {training_summary(rows)}.",
            f"- Machine: {machine_line}.",
            f"- Command: `{command}`", ""]
    out += ["Training error: running top-1 error on the augmented training batches over the last 10 % of the "
            "steps (the end of Fig. 6's thin curves). Test errors: the final model on each evaluation split. "
            "Mean ± std over seeds (no ± with one seed). Paper: test error of a full-length run "
            "(Table 6, or read off Fig. 6 where marked ≈).", ""]
    header = ["net", "depth", "seeds", "steps", "train error %"] + [f"{s} error %" for s in eval_splits]
    header += ["paper test error %", "train min"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = sorted({(r["type"], r["depth"]) for r in rows}, key=lambda k: (k[0] != "plain", k[1]))
    for kind, depth in groups:
        members = [r for r in rows if r["type"] == kind and r["depth"] == depth and not r.get("failed")]
        failed = [r for r in rows if r["type"] == kind and r["depth"] == depth and r.get("failed")]
        cells = [f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}", str(depth),
                 f"{len(members)}" + (f" (+{len(failed)} diverged)" if failed else ""),
                 "/".join(sorted({str(r["steps"]) for r in members})) or "—",
                 pct(*mean_std([r["train_error"] for r in members])[:2])]
        cells += [pct(*mean_std([r.get(f"{s}_error") for r in members])[:2]) for s in eval_splits]
        paper = PAPER_TEST_ERROR.get((kind, depth))
        cells.append(f"{paper[0]:.2f} ({paper[1]})" if paper else "—")
        cells.append(f"{sum(r.get('minutes') or 0 for r in members):.1f}")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## What it shows", ""]
    out += findings(rows, headline) or ["- Nothing to compare: one depth per net type."]
    if schedule.name != "paper":
        out += ["", f"The `{schedule.name}` schedule is far shorter than the paper's 64k steps: compare nets "
                "with each other here, not with the paper's column."]
    out += ["", "Noise: two standard errors of the difference, from the binomial sampling error of each error "
            "rate on the images it was measured on, plus the spread over seeds when there are several.",
            "", "Files: `fig6.png` (thin dashed: training error; bold: "
            f"{headline} error), `results.json` (one row per run), one workdir per run.", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))
    return path


def training_summary(rows: list[dict]) -> str:
    """Total wall time of the runs' train_and_evaluate calls and when they finished (from
    their done.json, so a rerun that only rebuilds the report keeps the real numbers)."""
    finished = sorted(r["finished"] for r in rows if r.get("finished"))
    total = sum(r.get("minutes") or 0 for r in rows)
    text = f"{len(rows)} runs, {total:.1f} min of training in all (compilation, data loading and evaluations included)"
    return text + (f", finished {finished[0]} … {finished[-1]}" if finished else "")


def figure_runs(rows: list[dict]) -> list[dict]:
    """Rows -> the dicts figures.degradation_png draws."""
    runs = []
    for r in rows:
        train_curve, eval_curve = r["curves"]["train"], r["curves"]["eval"]
        runs.append({"depth": r["depth"], "skip": r["type"] == "resnet", "seed": r["seed"],
                     "steps": [s for s, _ in train_curve], "train_error": [e for _, e in train_curve],
                     "eval_steps": [s for s, _ in eval_curve], "test_error": [e for _, e in eval_curve]})
    return runs


# ---------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error here
        raise UsageError(message)


def command_line(prog: str, argv: Sequence[str]) -> str:
    return " ".join(["python -m", prog, *map(shlex.quote, argv)])


def fail(message: str, code: int = USER_ERROR_EXIT) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m experiments.degradation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="experiment folder: one sub-workdir per run")
    parser.add_argument("--depths", default=None, help="comma-separated CIFAR depths 6n+2 (default: the schedule's)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per (net, depth): 0 .. N-1")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="paper")
    parser.add_argument("--data", default=None, help="tfds | npz:PATH | synthetic (default: tfds; synthetic for smoke)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    return args


def run_experiment(args: argparse.Namespace, command: str, log: Callable[[str], None] = print) -> dict:
    """Trains what is missing, then writes fig6.png, table.md and results.json."""
    schedule = SCHEDULES[args.schedule]
    depths = parse_depths(args.depths, schedule)
    data = parse_data(args.data, schedule)
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    check_experiment(workdir, {"experiment": "degradation", "schedule": schedule.name, "data": str(data)})
    started = datetime.datetime.now().isoformat(timespec="seconds")
    start = time.time()
    machine_line = machine()
    log(f"degradation: {schedule.name} schedule, depths {depths}, {args.seeds} seed(s), data {data}; {machine_line}")

    plan = [(kind, depth, seed) for depth in depths for kind in ("plain", "resnet") for seed in range(args.seeds)]
    rows = []
    for index, (kind, depth, seed) in enumerate(plan, 1):
        name = f"{kind}{depth}_seed{seed}"
        config = make_config(f"{kind}{depth}", seed, schedule, data)
        run_dir = os.path.join(workdir, name)
        done = run_or_skip(f"[{index}/{len(plan)}] {name}", config, run_dir, log)
        rows.append(run_row(name, done, run_dir, config, {"type": kind, "depth": depth}))

    from resnet_jax import figures

    figures.degradation_png(figure_runs([r for r in rows if not r.get("failed")]) or figure_runs(rows),
                            os.path.join(workdir, "fig6.png"),
                            title=f"plain vs residual nets on CIFAR-10 ({schedule.name} schedule; "
                                  "He et al. 2015, Fig. 6)")
    minutes = (time.time() - start) / 60
    write_table(os.path.join(workdir, "table.md"), rows, schedule, data, command, started, machine_line, minutes)
    _write_json(os.path.join(workdir, "results.json"), [{k: v for k, v in r.items() if k != "curves"} for r in rows])
    log(f"wrote {workdir}/fig6.png, table.md, results.json ({minutes:.1f} min)")
    return {"rows": rows, "workdir": workdir}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        parse_depths(args.depths, SCHEDULES[args.schedule])  # bad flags fail before jax loads
        parse_data(args.data, SCHEDULES[args.schedule])
        from resnet_jax import train
        from resnet_jax.errors import UserError

        try:
            run_experiment(args, command_line("experiments.degradation", argv), log=lambda line: print(line, flush=True))
        except UserError as error:
            fail(str(error))
        except train.Preempted as error:
            fail(str(error), PREEMPTED_EXIT)
    except UsageError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", PREEMPTED_EXIT)


if __name__ == "__main__":
    main()
