"""He et al. 2015, Fig. 6 / Table 6: plain vs residual nets on CIFAR-10 at several depths.

    python -m experiments.degradation --workdir=runs/degradation                   # paper
    python -m experiments.degradation --workdir=runs/degradation_short --schedule=short \\
        --depths=20,56 --data=npz:cifar10.npz   # python -m resnet_jax.data.cifar_npz makes it
    python -m experiments.degradation --workdir=/tmp/deg_smoke --schedule=smoke    # < 1 min
    python -m experiments.degradation --workdir=runs/degradation_preact --family=preact   # v2 nets

Trains plain-d and ResNet-d for every depth d and seed, one workdir each (WORKDIR/plain20_seed0,
WORKDIR/resnet20_seed0, ...). Each run is the configs/cifar.py variant
`<plain|resnet><d>,<schedule>[,<source>]` (`resnet-jax configs` describes the schedules paper,
gpu, short and smoke), so each is one `python -m resnet_jax.main` command, printed as it starts
and in table.md. A finished run is skipped, an interrupted one resumes: repeat the command until
everything is done. Then it writes WORKDIR/fig6.png (the Fig. 6 replica), WORKDIR/table.md (ours
beside the paper's, and whether degradation shows) and WORKDIR/results.json (one row per run).

On a GPU, the paper's recipe in bfloat16 (`gpu_paper`), several runs sharing the card, only
whole runs that fit 9 minutes, records kept (see scripts/gpu/plan.sh):

    python -m experiments.degradation --workdir=/tmp/deg --schedule=gpu_paper --data=npz:cifar10.npz \
        --concurrent=auto --calibration=calibration.json --budget_s=540 --records=docs/reproduction/CARD_DATE

--concurrent=K trains up to K runs at once, each its own resnet_jax.main process (CUDA MPS where
`nvidia-cuda-mps-control` exists); --budget_s starts a run only if calibration.json predicts it
ends in time, and says which are left (exit 3; the same command continues). --records: folders
of earlier runs' records (config.json, metrics.jsonl, done.json; no checkpoints); runs found
there are skipped, runs finished now are copied into the first, and the tables are built from
the records, so a study can grow over several invocations and machines.

Expected (paper): ResNet test error falls with depth (8.75 % at 20 to 6.97 % at 56) while plain
nets get worse (Fig. 6: plain-56 has higher training *and* test error than plain-20).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

from absl import flags

from . import runs
from resnet_jax import cli
from resnet_jax.errors import UserError

# He et al. 2015, Table 6 (CIFAR-10 test error, %; ResNet-110 best of 5 runs, mean 6.61 ± 0.16).
# Plain nets have no table: plain-20 ~9.5 % and plain-56 ~13.5 % are read off Fig. 6 (left).
# Depths without a number there are left blank rather than guessed.
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
DEFAULT_DEPTHS = {"paper": (20, 32, 44, 56), "gpu_paper": (20, 56), "gpu": (20, 56), "short": (20, 56), "smoke": (8, 14)}

FLAGS = flags.FlagValues()
runs.define_flags(FLAGS, DEFAULT_DEPTHS)
flags.DEFINE_enum("family", "v1", ["v1", "preact"], "v1: He et al. 2015's nets; preact: their pre-activation "
                  "twins (preplain/preresnet, He et al. 2016).", flag_values=FLAGS)
# He et al. 2016, Table 2 (CIFAR-10 test error, %): the pre-activation ResNet-110 and -164.
PREACT_PAPER_TEST_ERROR = {("resnet", 110): (6.37, "He et al. 2016, Table 2"),
                           ("resnet", 164): (5.46, "He et al. 2016, Table 2"),
                           ("resnet", 1001): (4.92, "He et al. 2016, Table 3")}
flags.DEFINE_list("depths", None, "CIFAR depths 6n+2, comma separated (default: paper 20,32,44,56; gpu and "
                  "short 20,56; smoke 8,14); with --family=preact also the bottleneck depths 9n+2 from 164 "
                  "(164, 1001).", flag_values=FLAGS)


def plan(schedule: str, depths: Sequence[int], seeds: int, data: str | None,
         family: str = "v1") -> list[runs.RunSpec]:
    """plain-d and ResNet-d (pre-activation ones for family "preact") for every depth and
    seed, as configs/cifar.py variants, seed by seed."""
    source, overrides = runs.parse_data(data)
    suffix = f",{schedule}" + (f",{source}" if source else "")
    pre = "pre" if family == "preact" else ""
    # Seed-major: a budget that ends early leaves whole seeds of the study, not whole depths.
    return [runs.make_run(f"{pre}{kind}{depth}_seed{seed}", f"{pre}{kind}{depth}{suffix}",
                          {**overrides, **({"train.seed": seed} if seed else {})}, type=kind, depth=depth)
            for seed in range(seeds) for depth in depths for kind in ("plain", "resnet")]


def findings(rows: list[dict], eval_split: str) -> list[str]:
    """Plain words on what the table shows: degradation or not, residual gains or not."""
    ok = [r for r in rows if r["train_error"] is not None and not r.get("failed")]
    group = lambda kind, depth: [r for r in ok if r["type"] == kind and r["depth"] == depth]  # noqa: E731
    lines = []
    for kind, family in (("plain", "plain"), ("resnet", "ResNet")):
        depths = sorted({r["depth"] for r in ok if r["type"] == kind})
        for shallow, deep in zip(depths, depths[1:]):
            a, b = group(kind, shallow), group(kind, deep)
            labels = (f"{family}-{shallow}", f"{family}-{deep}")
            train_text, train_diff, train_noise = runs.compare(labels[0], a, labels[1], b, "train_error",
                                                               "train_error_images")
            test_text, test_diff, test_noise = runs.compare(labels[0], a, labels[1], b, f"{eval_split}_error",
                                                            f"{eval_split}_examples")
            if kind == "plain":
                verdict = ("**degradation shows**: the deeper plain net has the higher training error"
                           if train_diff > train_noise else
                           "**degradation not established**: the deeper plain net's training error is higher, "
                           "but within the noise" if train_diff > 0 else
                           "**no degradation in this run**: the deeper plain net's training error is not higher")
            else:
                verdict = ("**the deeper ResNet is better** in training and test error"
                           if train_diff < -train_noise and test_diff < -test_noise else
                           "the deeper ResNet is better in both, but within the noise"
                           if train_diff < 0 and test_diff < 0 else
                           "**mixed**: the deeper ResNet is better in one of training/test error only"
                           if train_diff < 0 or test_diff < 0 else "**the deeper ResNet does not improve** in this run")
            lines.append(f"- {labels[0]} → {labels[1]}: {verdict}. Training error: {train_text}; "
                         f"{eval_split} error: {test_text}.")
    for depth in sorted({r["depth"] for r in ok}):
        plain, res = group("plain", depth), group("resnet", depth)
        if plain and res:
            text, diff, noise = runs.compare(f"plain-{depth}", plain, f"ResNet-{depth}", res, "train_error",
                                             "train_error_images")
            word = "lower" if diff < -noise else "higher" if diff > noise else "about the same (within noise)"
            lines.append(f"- At depth {depth} the ResNet's training error is {word}: {text}.")
    return lines + [f"- {r['name']} diverged: {r['failed']}" for r in rows if r.get("failed")]


def write_table(path: str, rows: list[dict], schedule: str, data: str, command: str,
                left: dict[str, str] | None = None) -> None:
    """table.md from the rows alone (their records): rebuilt from the same records, the
    same file, whichever invocation or machine trained them."""
    eval_splits, headline = rows[0]["eval_splits"], rows[0]["headline_split"]
    out = ["# Degradation: plain vs residual nets on CIFAR-10 (He et al. 2015, Fig. 6 / Table 6)", "",
           f"- Schedule: `{schedule}` (configs/cifar.py; `resnet-jax configs` describes it); data `{data}`.",
           f"- Training: {runs.training_summary(rows)}.", f"- Ran on: {runs.cards(rows)}.", f"- Command: `{command}`",
           "", "Training error: running top-1 error on the augmented training batches over the last 10 % of the "
           "steps (the end of Fig. 6's thin curves). Test errors: the final model on each evaluation split. "
           "Mean ± std over seeds (no ± with one seed). Paper: test error of a full-length run "
           "(Table 6, or read off Fig. 6 where marked ≈). Each row's runs: `## Commands` below.", ""]
    header = ["net", "depth", "seeds", "steps", "train error %", *[f"{s} error %" for s in eval_splits],
              f"best {headline} error %", "paper test error %", "train min", "configs/cifar.py variant"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, depth in sorted({(r["type"], r["depth"]) for r in rows}, key=lambda k: (k[0] != "plain", k[1])):
        members = [r for r in rows if r["type"] == kind and r["depth"] == depth and not r.get("failed")]
        failed = [r for r in rows if r["type"] == kind and r["depth"] == depth and r.get("failed")]
        paper = (PREACT_PAPER_TEST_ERROR if members and members[0]["model"].startswith("pre") else
                 PAPER_TEST_ERROR).get((kind, depth))
        cells = [f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}", str(depth),
                 f"{len(members)}" + (f" (+{len(failed)} diverged)" if failed else ""),
                 "/".join(sorted({str(r["steps"]) for r in members})) or "—",
                 runs.pct(*runs.mean_std([r["train_error"] for r in members])[:2]),
                 *[runs.pct(*runs.mean_std([r.get(f"{s}_error") for r in members])[:2]) for s in eval_splits],
                 runs.pct(*runs.mean_std([r.get(f"{headline}_best_error") for r in members])[:2]),
                 f"{paper[0]:.2f} ({paper[1]})" if paper else "—",
                 f"{sum(r.get('minutes') or 0 for r in members):.1f}",
                 f"`{(members or failed)[0]['variant']}`"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## What it shows", "", *(findings(rows, headline) or ["- Nothing to compare: one depth per net type."])]
    if left:
        out += ["", "## Not yet run", "", "The same command continues with these (finished runs are skipped):", "",
                *[f"- `{name}`: {why}" for name, why in left.items()]]
    if schedule not in ("paper", "gpu_paper"):
        out += ["", f"The `{schedule}` schedule is shorter than the paper's 64k steps: compare nets with each other "
                "here, not with the paper's column."]
    out += ["", "Noise: two standard errors of the difference, from the binomial sampling error of each error rate "
            "on the images it was measured on, plus the spread over seeds when there are several.", "",
            f"Files: `fig6.png` (thin dashed: training error; bold: {headline} error), `results.json` (one row per "
            "run), one record per run (config.json, metrics.jsonl, done.json).", "", *runs.commands_section(rows)]
    with open(path, "w") as f:
        f.write("\n".join(out))


def experiment_command(workdir: str, schedule: str, depths: Sequence[int], seeds: int, data: str | None,
                       records: Sequence[str] = (), family: str = "v1") -> str:
    """The command that builds this study (how its runs share the machine left out: the
    results do not depend on it)."""
    args = [f"--workdir={workdir}", f"--schedule={schedule}", f"--depths={','.join(map(str, depths))}",
            f"--seeds={seeds}", *([f"--data={data}"] if data else []),
            *([f"--records={','.join(records)}"] if records else []),
            *(["--family=preact"] if family == "preact" else [])]
    return runs.command_line("experiments.degradation", ["", *args])


def run_experiment(workdir: str, *, schedule: str = "paper", depths: Sequence[int] | None = None, seeds: int = 1,
                   data: str | None = None, family: str = "v1", concurrent: int | str = 1, calibration: str = "", budget_s: float = 0,
                   records: Sequence[str] = (), log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Trains what is not recorded yet (whole runs only, within `budget_s` when given), then
    writes fig6.png, table.md and results.json into `workdir` from the runs' records.

    Args:
      workdir: the experiment's folder (one workdir per run inside).
      schedule, depths, seeds, data, family: which runs (see the module docstring).
      concurrent: runs at once (or "auto", from `calibration`).
      calibration: calibration.json for "auto" and `budget_s`.
      budget_s: seconds of training this invocation may take (0: no limit).
      records: folders of records from earlier invocations; new records are copied into the first.
      log: where progress lines go.

    Returns:
      (rows of results.json, {run name: why it is left for the next invocation}).
    """
    depths = runs.parse_depths([str(d) for d in depths] if depths else None, DEFAULT_DEPTHS[schedule],
                               preact=family == "preact")
    planned = plan(schedule, depths, seeds, data, family)  # bad --data fails here, before JAX loads
    concurrent, calibrated = runs.sharing(str(concurrent), calibration, budget_s)
    records = runs.parse_records(records)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    runs.check_experiment(workdir, {"experiment": "degradation", "schedule": schedule, "data": data or "",
                                    **({"family": "preact"} if family == "preact" else {})})
    start = time.time()
    log(f"degradation: {schedule} schedule, depths {depths}, {seeds} seed(s), data {data or 'default'}, "
        f"{concurrent} at once")
    outcome = runs.train_in(workdir, planned, concurrent=concurrent, calibration=calibrated, records_in=records,
                            budget_s=budget_s, log=log)
    rows = [runs.result_row(run, outcome.done[run.name], os.path.join(workdir, run.name))
            for run in planned if run.name in outcome.done]
    if rows:
        from . import plots  # matplotlib: only once there is something to draw

        plots.degradation_png(runs.figure_runs(rows), os.path.join(workdir, "fig6.png"),
                              title=f"plain vs residual nets on CIFAR-10 ({schedule} schedule; He et al. 2015, Fig. 6)")
        write_table(os.path.join(workdir, "table.md"), rows, schedule, data or "the schedule's default",
                    experiment_command(workdir, schedule, depths, seeds, data, records, family), outcome.left)
        runs.save_results(os.path.join(workdir, "results.json"), rows)
    minutes = (time.time() - start) / 60
    log(f"wrote {workdir}/fig6.png, table.md, results.json ({len(rows)} of {len(planned)} runs; this invocation "
        f"{minutes:.1f} min)" if rows else f"no run finished yet ({minutes:.1f} min)")
    return rows, outcome.left


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        if not FLAGS.workdir:
            raise UserError("--workdir is required")
        _, left = run_experiment(FLAGS.workdir, schedule=FLAGS.schedule, depths=FLAGS.depths, seeds=FLAGS.seeds,
                                 data=FLAGS.data, family=FLAGS.family, concurrent=FLAGS.concurrent, calibration=FLAGS.calibration,
                                 budget_s=FLAGS.budget_s, records=FLAGS.records or (),
                                 log=lambda line: print(line, flush=True))
    runs.exit_if_left(left)


if __name__ == "__main__":
    main()
