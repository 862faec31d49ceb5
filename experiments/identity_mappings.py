"""He et al. 2016 ("Identity Mappings in Deep Residual Networks"), Table 1 and Table 2 on CIFAR-10.

    python -m experiments.identity_mappings --table=activations --workdir=runs/im_act          # paper
    python -m experiments.identity_mappings --table=activations --depth=164 --workdir=runs/im_act164
    python -m experiments.identity_mappings --table=shortcuts --workdir=runs/im_short --schedule=gpu
    python -m experiments.identity_mappings --table=activations --workdir=/tmp/im --schedule=smoke  # < 2 min

--table=shortcuts: the shortcut variants of Table 1 (Fig. 2) on the original unit of ResNet-110.
--table=activations: the orderings of Table 2 (Fig. 4) on ResNet-110 (basic units, option A)
or ResNet-164 (bottleneck units, projections where the shape changes, resnet-pre-act.lua).
Every cell is the configs/cifar.py variant `<net>,<schedule>[,<source>]` plus --config.model.*
fields, one `python -m resnet_jax.main` command each (table.md lists them); a finished run is
skipped and an interrupted one resumes, as in experiments.degradation. The smoke schedule
runs the same rows on ResNet-8 (`--depth` defaults to 8 there): a pipeline check.

Paper columns, transcribed by hand from arXiv 1603.05027v3 (Table 1: ResNet-110, "fail" =
test error above 20 %; Table 2: ResNet-110 and ResNet-164). The paper reports the median of 5
runs for every CIFAR architecture ("Throughout this paper we report the median accuracy of 5
runs for each architecture on CIFAR"); its ResNet-110 baseline, 6.61, is also He et al. 2015's
mean of 5 (6.61 +/- 0.16). With --seeds=5 our column is the mean +/- std of 5 runs and table.md
prints the median beside it.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from absl import flags

from . import runs
from resnet_jax import cli
from resnet_jax.errors import UserError

# (row key, case, figure, overrides of config.model, paper test error at depth 110 / 164 (%)).
SHORTCUT_ROWS = [
    ("original", "original (1 on h, 1 on F)", "2(a)", {}, "6.61"),
    ("scale_0_1", "constant scaling: 0 on h, 1 on F (a plain net)", "2(b)",
     {"shortcut_variant": "scaling", "shortcut_scale": 0.0}, "fail"),
    ("scale_05_1", "constant scaling: 0.5 on h, 1 on F", "2(b)",
     {"shortcut_variant": "scaling", "shortcut_scale": 0.5}, "fail"),
    ("scale_05_05", "constant scaling: 0.5 on h, 0.5 on F", "2(b)",
     {"shortcut_variant": "scaling", "shortcut_scale": 0.5, "scale_on": "both"}, "12.35"),
    ("excl_gate_0", "exclusive gating, b_g = 0 (paper: 0 to -5)", "2(c)",
     {"shortcut_variant": "exclusive_gating", "gate_bias": 0.0}, "fail"),
    ("excl_gate_6", "exclusive gating, b_g = -6", "2(c)", {"shortcut_variant": "exclusive_gating"}, "8.70"),
    ("excl_gate_7", "exclusive gating, b_g = -7", "2(c)",
     {"shortcut_variant": "exclusive_gating", "gate_bias": -7.0}, "9.81"),
    ("short_gate_0", "shortcut-only gating, b_g = 0", "2(d)",
     {"shortcut_variant": "shortcut_gating", "gate_bias": 0.0}, "12.86"),
    ("short_gate_6", "shortcut-only gating, b_g = -6", "2(d)", {"shortcut_variant": "shortcut_gating"}, "6.91"),
    ("conv1x1", "1x1 conv shortcut", "2(e)", {"shortcut_variant": "conv1x1"}, "12.22"),
    ("dropout", "dropout shortcut, 0.5", "2(f)", {"shortcut_variant": "dropout"}, "fail"),
]
ACTIVATION_ROWS = [
    ("original", "original unit", "4(a)", {"activation_order": "original"}, {110: "6.61", 164: "5.93"}),
    ("bn_after_add", "BN after addition", "4(b)", {"activation_order": "bn_after_add"}, {110: "8.17", 164: "6.50"}),
    ("relu_before_add", "ReLU before addition", "4(c)", {"activation_order": "relu_before_add"},
     {110: "7.84", 164: "6.14"}),
    ("relu_preact", "ReLU-only pre-activation", "4(d)", {"activation_order": "relu_preact"},
     {110: "6.71", 164: "5.91"}),
    ("full_preact", "full pre-activation", "4(e)", {"activation_order": "full_preact"}, {110: "6.37", 164: "5.46"}),
]
TABLES = {"shortcuts": "Table 1", "activations": "Table 2"}
SCHEDULES = ("paper", "gpu", "short", "smoke")

FLAGS = flags.FlagValues()
runs.define_flags(FLAGS, SCHEDULES)
flags.DEFINE_enum("table", None, list(TABLES), "shortcuts (Table 1) or activations (Table 2).", flag_values=FLAGS)
flags.DEFINE_integer("depth", None, "110 or 164 (activations; shortcuts is ResNet-110 only); default 110, 8 for "
                     "smoke. Any CIFAR depth 6n+2 (basic) or 9n+2 from 164 on (bottleneck) runs.", flag_values=FLAGS)


def base_net(depth: int) -> str:
    """The configs/cifar.py model of `depth`: ResNet-d (basic, option A) below 164, the
    bottleneck skeleton of resnet-pre-act.lua from 164 on (the ordering is a row's field)."""
    block = runs.cifar_block(depth, preact=True)
    if block == "bottleneck":
        return f"preresnet{depth}"
    if block == "basic":
        return f"resnet{depth}"
    raise UserError(f"--depth={depth} is not a CIFAR depth 6n+2 or a bottleneck depth 9n+2 from 164")


def rows_of(table: str, depth: int) -> list[tuple[str, str, str, dict, str]]:
    """(key, case, figure, model overrides, paper error or "—") of every row of `table`."""
    if table == "shortcuts":
        if depth >= 164:
            raise UserError("--table=shortcuts is Table 1, run on ResNet-110 only (basic units); use --depth=110")
        return [(k, c, f, o, p if depth == 110 else "—") for k, c, f, o, p in SHORTCUT_ROWS]
    return [(k, c, f, o, p.get(depth, "—")) for k, c, f, o, p in ACTIVATION_ROWS]


def plan(table: str, schedule: str, depth: int, seeds: int, data: str | None) -> list[runs.RunSpec]:
    source, data_overrides = runs.parse_data(data)
    suffix = f",{schedule}" + (f",{source}" if source else "")
    planned = []
    for key, case, figure, overrides, paper in rows_of(table, depth):
        fields = {f"model.{k}": v for k, v in overrides.items()}
        for seed in range(seeds):
            planned.append(runs.make_run(f"{key}_seed{seed}", base_net(depth) + suffix,
                                         {**data_overrides, **fields, **({"train.seed": seed} if seed else {})},
                                         type="resnet", row=key, case=case, figure=figure, paper=paper, depth=depth))
    return planned


def error_cell(errors: Sequence[float | None]) -> str:
    """Mean ± std of the seeds' errors, and their median once there are 3 or more: the paper's
    cells are medians of 5 runs, so that is the number to hold beside its column."""
    errors = [e for e in errors if e is not None]
    cell = runs.pct(*runs.mean_std(errors)[:2])
    return cell + (f" (median {100 * statistics.median(errors):.2f})" if len(errors) >= 3 else "")


def write_table(path: str, rows: list[dict], table: str, depth: int, schedule: str, data: str, command: str,
                started: str, machine_line: str, minutes: float) -> None:
    headline = rows[0]["headline_split"]
    paper_depth = 110 if table == "shortcuts" else depth
    out = [f"# He et al. 2016, {TABLES[table]}: {table} on CIFAR-10, depth {depth}", "",
           f"- Schedule: `{schedule}` (configs/cifar.py; `resnet-jax configs` describes it); data `{data}`.",
           f"- Date: {started}; wall time of this invocation {minutes:.1f} min.",
           f"- Training: {runs.training_summary(rows)}.", f"- Machine: {machine_line}.", f"- Command: `{command}`", "",
           f"Ours: the final model's {headline} error (mean ± std over seeds; the median from 3 seeds on), and "
           "the running training error "
           f"over the last 10 % of steps. Paper: ResNet-{paper_depth}'s CIFAR-10 test error in {TABLES[table]} of "
           "arXiv 1603.05027 (\"fail\": above 20 %). Noise of one error rate measured on n test images: ± two "
           "binomial standard errors, given per row.", ""]
    header = ["case", "Fig.", "seeds", "steps", "train error %", f"{headline} error %", "noise ± (n)",
              f"paper error % (ResNet-{paper_depth})"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in dict.fromkeys(r["row"] for r in rows):
        members = [r for r in rows if r["row"] == key and not r.get("failed")]
        failed = [r for r in rows if r["row"] == key and r.get("failed")]
        first = (members or failed)[0]
        mean, std, _ = runs.mean_std([r.get(f"{headline}_error") for r in members])
        examples = sum(r.get(f"{headline}_examples") or 0 for r in members)
        noise = f"{200 * runs.binomial_se(mean, examples):.2f} ({examples})" if mean is not None else "—"
        cells = [first["case"], first["figure"], f"{len(members)}" + (f" (+{len(failed)} diverged)" if failed else ""),
                 "/".join(sorted({str(r["steps"]) for r in members})) or "—",
                 runs.pct(*runs.mean_std([r["train_error"] for r in members])[:2]),
                 error_cell([r.get(f"{headline}_error") for r in members]), noise,
                 first["paper"]]
        out.append("| " + " | ".join(cells) + " |")
    if schedule != "paper":
        out += ["", f"The `{schedule}` schedule is shorter than the paper's 64k steps: its errors are the start of "
                "training; compare rows with each other here, not with the paper's column."]
    out += ["", *runs.commands_section(rows)]
    with open(path, "w") as f:
        f.write("\n".join(out))


def run_experiment(workdir: str, *, table: str, schedule: str = "paper", depth: int | None = None, seeds: int = 1,
                   data: str | None = None, concurrent: int | str = 1, calibration: str = "", budget_s: float = 0,
                   records: Sequence[str] = (), log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Trains what is not recorded yet (whole runs only, within `budget_s` when given), then
    writes curves.png, table.md and results.json into `workdir` from the runs' records.

    Returns:
      (rows of results.json, {run name: why it is left for the next invocation}).
    """
    if not table:
        raise UserError("--table is required: shortcuts or activations")
    depth = depth or (8 if schedule == "smoke" else 110)
    planned = plan(table, schedule, depth, seeds, data)
    concurrent, calibrated = runs.sharing(str(concurrent), calibration, budget_s)
    records = runs.parse_records(records)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    runs.check_experiment(workdir, {"experiment": f"identity_mappings:{table}", "depth": depth, "schedule": schedule,
                                    "data": data or ""})
    started, start = datetime.datetime.now().isoformat(timespec="seconds"), time.time()
    machine_line = runs.machine_line(in_process=concurrent == 1)
    log(f"identity_mappings: {TABLES[table]} ({table}), depth {depth}, {schedule} schedule, {seeds} seed(s), "
        f"{concurrent} at once; {machine_line}")
    outcome = runs.train_in(workdir, planned, concurrent=concurrent, calibration=calibrated, records_in=records,
                            budget_s=budget_s, log=log)
    rows = [runs.result_row(run, outcome.done[run.name], os.path.join(workdir, run.name))
            for run in planned if run.name in outcome.done]
    minutes = (time.time() - start) / 60
    if not rows:
        log(f"no run finished yet ({minutes:.1f} min)")
        return rows, outcome.left
    from . import plots  # matplotlib: only once there is something to draw

    drawn = runs.figure_runs(rows)
    variants = [(next(r["case"] for r in drawn if r["row"] == key), [r for r in drawn if r["row"] == key])
                for key in dict.fromkeys(r["row"] for r in drawn)]
    plots.study_png(variants, os.path.join(workdir, "curves.png"), eval_name=rows[0]["headline_split"],
                    title=f"He et al. 2016 {TABLES[table]} ({table}), depth {depth}, {schedule} schedule")
    args = [f"--workdir={workdir}", f"--table={table}", f"--depth={depth}", f"--schedule={schedule}",
            f"--seeds={seeds}", *([f"--data={data}"] if data else []),
            *([f"--records={','.join(records)}"] if records else [])]
    write_table(os.path.join(workdir, "table.md"), rows, table, depth, schedule, data or "the schedule's default",
                runs.command_line("experiments.identity_mappings", ["", *args]), started, machine_line, minutes)
    runs.save_results(os.path.join(workdir, "results.json"), rows)
    log(f"wrote {workdir}/curves.png, table.md, results.json ({len(rows)} of {len(planned)} runs; {minutes:.1f} min)")
    return rows, outcome.left


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        if not FLAGS.workdir:
            raise UserError("--workdir is required")
        _, left = run_experiment(FLAGS.workdir, table=FLAGS.table, schedule=FLAGS.schedule, depth=FLAGS.depth,
                                 seeds=FLAGS.seeds, data=FLAGS.data, concurrent=FLAGS.concurrent,
                                 calibration=FLAGS.calibration, budget_s=FLAGS.budget_s, records=FLAGS.records or (),
                                 log=lambda line: print(line, flush=True))
    runs.exit_if_left(left)


if __name__ == "__main__":
    main()
