"""From runs' records to a study's rows, noise estimates and the Markdown they share.

Everything here reads records (done.json, config.json, metrics.jsonl) and never a
checkpoint, so a study rebuilds from copied records alone.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence

from resnet_jax.errors import UserError

from .records import read_json, read_metrics, write_json
from .spec import RunSpec


def curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """split -> [(step, error)] from metrics.jsonl, sorted, one point per step (a resumed
    run may log a step twice: the later record wins)."""
    by_split: dict[str, dict[int, float]] = {}
    for record in read_metrics(workdir):
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


def result_row(run: RunSpec, done: dict, workdir: str) -> dict:
    """One results.json row: the run's command, its final errors (fractions), its curves
    ("steps", "train_error", "eval_steps", "test_error": what the figures draw), read from
    the folder its record is in (`done["record_dir"]`, else `workdir`)."""
    from resnet_jax.config import parse_splits  # the config schema's own parser

    folder = done.get("record_dir") or workdir
    config = run.config()
    eval_names = list(parse_splits(config.data.eval_splits))
    lines = curves(folder)
    train_curve, total = lines.get("train", []), config.train.total_steps
    tail_windows = len([s for s, _ in train_curve if s > 0.9 * total]) or (1 if train_curve else 0)
    row = {"name": run.name, **dict(run.info), "seed": config.train.seed, "model": config.model.name,
           "variant": run.variant, "command": done.get("command") or run.command(workdir),
           "steps": done.get("step"), "total_steps": total, "train_error": final_train_error(train_curve, total),
           "train_error_images": tail_windows * config.train.log_every * config.train.batch_size,
           "workdir": os.path.abspath(folder), "minutes": done.get("minutes"), "finished": done.get("finished"),
           "card": done.get("card"), "failed": done.get("failed")}
    results, best = done.get("results") or {}, done.get("best") or {}
    for split in eval_names:
        row[f"{split}_error"] = results.get(split, {}).get("error")
        row[f"{split}_examples"] = results.get(split, {}).get("examples")
        row[f"{split}_best_error"] = best.get(split, {}).get("error")
    row["eval_splits"], row["headline_split"] = eval_names, eval_names[0]
    if "test" not in eval_names:  # "test_error": the headline, unless a split is called test
        row["test_error"] = row[f"{eval_names[0]}_error"]
    eval_curve = lines.get(eval_names[0], [])
    row["curves"] = {"steps": [s for s, _ in train_curve], "train_error": [e for _, e in train_curve],
                     "eval_steps": [s for s, _ in eval_curve], "test_error": [e for _, e in eval_curve]}
    return row


def figure_runs(rows: list[dict]) -> list[dict]:
    """Rows -> the dicts plots.degradation_png and plots.study_png draw (failed runs left out
    when any succeeded)."""
    ok = [r for r in rows if not r.get("failed")] or rows
    return [{**{k: v for k, v in r.items() if k != "curves"}, "skip": r.get("type") != "plain", **r["curves"]}
            for r in ok]


def save_results(path: str, rows: list[dict]) -> None:
    write_json(path, [{k: v for k, v in r.items() if k != "curves"} for r in rows])


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


def training_summary(rows: list[dict]) -> str:
    """Total wall time of the runs and when they finished (from their done.json, so a rerun
    that only rebuilds the report keeps the real numbers)."""
    finished = sorted(r["finished"] for r in rows if r.get("finished"))
    total = sum(r.get("minutes") or 0 for r in rows)
    text = f"{len(rows)} runs, {total:.1f} min of training in all (compilation, data loading and evaluations included)"
    return text + (f", finished {finished[0]} … {finished[-1]}" if finished else "")


def cards(rows: list[dict]) -> str:
    """The cards and versions the rows' runs ran on, from their records."""
    seen = sorted({r["card"] for r in rows if r.get("card")})
    return "; ".join(seen) or "not recorded"


def commands_section(rows: list[dict]) -> list[str]:
    """Markdown: the command that reproduces each run (and so each cell of the tables)."""
    out = ["## Commands", "", "Each run alone (the same command resumes it; another --workdir starts afresh):", ""]
    return out + [f"- `{r['name']}`: `{r['command']}`" for r in rows] + [""]
