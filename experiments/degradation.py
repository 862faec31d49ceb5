"""He et al. 2015, Fig. 6 / Table 6: plain vs residual nets on CIFAR-10 at several depths.

    python -m experiments.degradation --workdir=runs/degradation                   # paper
    python -m experiments.degradation --workdir=runs/degradation_short --schedule=short \\
        --depths=20,56 --data=npz:../shared/data/cifar10/cifar10.npz
    python -m experiments.degradation --workdir=/tmp/deg_smoke --schedule=smoke    # < 1 min
    python -m experiments.degradation --workdir=runs/degradation_preact --family=preact   # v2 nets

Trains plain-d and ResNet-d for every depth d and seed, one workdir each (WORKDIR/plain20_seed0,
WORKDIR/resnet20_seed0, ...). Each run is the configs/cifar.py variant
`<plain|resnet><d>,<schedule>[,<source>]` (`resnet-jax configs` describes the schedules paper,
gpu, short and smoke), so each is one `python -m resnet_jax.main` command, printed as it starts
and in table.md. A finished run is skipped, an interrupted one resumes: repeat the command until
everything is done. Then it writes WORKDIR/fig6.png (the Fig. 6 replica), WORKDIR/table.md (ours
beside the paper's, and whether degradation shows) and WORKDIR/results.json (one row per run).

Expected (paper): ResNet test error falls with depth (8.75 % at 20 to 6.97 % at 56) while plain
nets get worse (Fig. 6: plain-56 has higher training *and* test error than plain-20).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence

from absl import flags

from experiments import runs
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
DEFAULT_DEPTHS = {"paper": (20, 32, 44, 56), "gpu": (20, 56), "short": (20, 56), "smoke": (8, 14)}

FLAGS = flags.FlagValues()
runs.define_flags(FLAGS, DEFAULT_DEPTHS)
flags.DEFINE_enum("family", "v1", ["v1", "preact"], "v1: He et al. 2015's nets; preact: their pre-activation "
                  "twins (preplain/preresnet, He et al. 2016).", flag_values=FLAGS)
# He et al. 2016, Table 2 (CIFAR-10 test error, %): the pre-activation ResNet-110 and -164.
PREACT_PAPER_TEST_ERROR = {("resnet", 110): (6.37, "He et al. 2016, Table 2"),
                           ("resnet", 164): (5.46, "He et al. 2016, Table 2")}
flags.DEFINE_list("depths", None, "CIFAR depths 6n+2, comma separated (default: paper 20,32,44,56; gpu and "
                  "short 20,56; smoke 8,14).", flag_values=FLAGS)


def plan(schedule: str, depths: Sequence[int], seeds: int, data: str | None, family: str = "v1") -> list[runs.Run]:
    """plain-d and ResNet-d for every depth and seed, as configs/cifar.py variants."""
    source, overrides = runs.parse_data(data)
    suffix = f",{schedule}" + (f",{source}" if source else "")
    pre = "pre" if family == "preact" else ""
    return [runs.make_run(f"{pre}{kind}{depth}_seed{seed}", f"{pre}{kind}{depth}{suffix}",
                          {**overrides, **({"train.seed": seed} if seed else {})}, type=kind, depth=depth)
            for depth in depths for kind in ("plain", "resnet") for seed in range(seeds)]


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


def write_table(path: str, rows: list[dict], schedule: str, data: str, command: str, started: str,
                machine_line: str, minutes: float) -> None:
    eval_splits, headline = rows[0]["eval_splits"], rows[0]["headline_split"]
    out = ["# Degradation: plain vs residual nets on CIFAR-10 (He et al. 2015, Fig. 6 / Table 6)", "",
           f"- Schedule: `{schedule}` (configs/cifar.py; `resnet-jax configs` describes it); data `{data}`.",
           f"- Date: {started}; wall time of this invocation {minutes:.1f} min (runs skipped as finished cost nothing).",
           f"- Training: {runs.training_summary(rows)}.", f"- Machine: {machine_line}.", f"- Command: `{command}`", "",
           "Training error: running top-1 error on the augmented training batches over the last 10 % of the "
           "steps (the end of Fig. 6's thin curves). Test errors: the final model on each evaluation split. "
           "Mean ± std over seeds (no ± with one seed). Paper: test error of a full-length run "
           "(Table 6, or read off Fig. 6 where marked ≈). Each row's runs: `## Commands` below.", ""]
    header = ["net", "depth", "seeds", "steps", "train error %", *[f"{s} error %" for s in eval_splits],
              "paper test error %", "train min", "configs/cifar.py variant"]
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
                 f"{paper[0]:.2f} ({paper[1]})" if paper else "—",
                 f"{sum(r.get('minutes') or 0 for r in members):.1f}",
                 f"`{(members or failed)[0]['variant']}`"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## What it shows", "", *(findings(rows, headline) or ["- Nothing to compare: one depth per net type."])]
    if schedule != "paper":
        out += ["", f"The `{schedule}` schedule is shorter than the paper's 64k steps: compare nets with each other "
                "here, not with the paper's column."]
    out += ["", "Noise: two standard errors of the difference, from the binomial sampling error of each error rate "
            "on the images it was measured on, plus the spread over seeds when there are several.", "",
            f"Files: `fig6.png` (thin dashed: training error; bold: {headline} error), `results.json` (one row per "
            "run), one workdir per run.", "", *runs.commands_section(rows)]
    with open(path, "w") as f:
        f.write("\n".join(out))


def run_experiment(argv: Sequence[str], log: Callable[[str], None] = print) -> list[dict]:
    """Trains what is missing, then writes fig6.png, table.md and results.json."""
    schedule, seeds = FLAGS.schedule, FLAGS.seeds
    depths = runs.parse_depths(FLAGS.depths, DEFAULT_DEPTHS[schedule])
    planned = plan(schedule, depths, seeds, FLAGS.data, FLAGS.family)  # bad --data fails here, before JAX loads
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    runs.check_experiment(workdir, {"experiment": "degradation", "schedule": schedule, "data": FLAGS.data or "",
                                    **({"family": "preact"} if FLAGS.family == "preact" else {})})
    started, start = datetime.datetime.now().isoformat(timespec="seconds"), time.time()
    machine_line = runs.machine()
    log(f"degradation: {schedule} schedule, depths {depths}, {seeds} seed(s), data {FLAGS.data or 'default'}; "
        f"{machine_line}")
    rows = []
    for index, run in enumerate(planned, 1):
        run_dir = os.path.join(workdir, run.name)
        done = runs.run_or_skip(run, run_dir, lambda line: log(f"[{index}/{len(planned)}] {line}"))
        rows.append(runs.result_row(run, done, run_dir))

    from resnet_jax import figures

    figures.degradation_png(runs.figure_runs(rows), os.path.join(workdir, "fig6.png"),
                            title=f"plain vs residual nets on CIFAR-10 ({schedule} schedule; He et al. 2015, Fig. 6)")
    minutes = (time.time() - start) / 60
    write_table(os.path.join(workdir, "table.md"), rows, schedule, FLAGS.data or "the schedule's default",
                runs.command_line("experiments.degradation", argv), started, machine_line, minutes)
    runs.save_results(os.path.join(workdir, "results.json"), rows)
    log(f"wrote {workdir}/fig6.png, table.md, results.json ({minutes:.1f} min)")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        if not FLAGS.workdir:
            raise UserError("--workdir is required")
        run_experiment(argv, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
