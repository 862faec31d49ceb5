"""What the skip connection's details do: shortcut A/B/C, zero-init, BN mode, gradient flow.

    python -m experiments.skip_ablation --workdir=runs/ablation                   # paper
    python -m experiments.skip_ablation --workdir=runs/ablation_short --schedule=short \\
        --data=npz:cifar10.npz     # python -m resnet_jax.data.cifar_npz makes it
    python -m experiments.skip_ablation --workdir=/tmp/abl --schedule=smoke --study=gradient_flow

Studies (--study, comma separated; all by default). The trained ones are ResNet-`--depth` runs
of the configs/cifar.py variant `resnet<depth>,<schedule>[,<source>]` with one config field
overridden, each a `python -m resnet_jax.main` command (printed as it starts and in table.md),
one workdir each; finished runs are skipped and interrupted ones resume:

  shortcut       option A (zero-pad, the paper's CIFAR choice) vs B (projection where the shape
                 changes) vs C (projection everywhere): --config.model.shortcut=B|C.
  zero_init      the last BN scale of every residual branch 1 (paper) or 0 (Goyal et al.):
                 --config.model.zero_init_residual=True.
  bn             BN statistics over the global batch (sync) vs over each device's part (the
                 paper's per-GPU BN; 2 GPUs of 64): --config.model.bn_sync=False, both on
                 --bn_devices devices. On a CPU with fewer devices the runs are their commands
                 in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N; on a
                 single accelerator the study is not run and the table says so.
  gradient_flow  no training: at initialisation, on one batch of the schedule's training data,
                 per conv layer in network order, the norm of d loss / d kernel and the std of
                 the conv's output, in train mode (batch statistics), for plain and residual
                 nets of --grad_depths.

--concurrent=K|auto, --calibration, --budget_s and --records share the machine and keep records as
in experiments.degradation (experiments.runs.train_all): up to K runs at once, whole runs only
within the budget, finished runs' records copied out and skipped next time.

The baseline run (shortcut A, zero-init off, sync BN on this process's devices) is shared by
the shortcut and zero_init studies. Outputs in WORKDIR: table.md, results.json (one row per
run), shortcut.png / zero_init.png / bn.png (training and test error curves per variant),
gradient_flow.png and gradient_flow.json.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from . import runs
from resnet_jax import cli
from resnet_jax.errors import UserError

STUDIES = ("shortcut", "zero_init", "bn", "gradient_flow")
DEFAULT_DEPTH = {"paper": 56, "gpu_paper": 56, "gpu": 56, "short": 20, "smoke": 8}  # depth of the trained studies
DEFAULT_GRAD_DEPTHS = {"paper": (20, 56, 110), "gpu_paper": (20, 56, 110), "gpu": (20, 56, 110), "short": (20, 56, 110), "smoke": (8, 14)}
DEFAULT_GRAD_BATCH = {"paper": 128, "gpu_paper": 128, "gpu": 128, "short": 128, "smoke": 16}

# Run variants: workdir suffix -> config overrides (--config.x=y in each run's command).
VARIANTS = {
    "baseline": {},
    "shortcutB": {"model.shortcut": "B"},
    "shortcutC": {"model.shortcut": "C"},
    "zeroinit": {"model.zero_init_residual": True},
    "bnsync": {"model.bn_sync": True},
    "bnlocal": {"model.bn_sync": False},
}
# Study -> [(label, variant)]; the first is what the others are compared with.
STUDY_VARIANTS = {
    "shortcut": [("A: zero-pad (paper, CIFAR)", "baseline"), ("B: projection where shape changes", "shortcutB"),
                 ("C: projection everywhere", "shortcutC")],
    "zero_init": [("off: last BN scale 1 (paper)", "baseline"), ("on: last BN scale 0", "zeroinit")],
    "bn": [("sync BN (global batch)", "bnsync"), ("per-device BN", "bnlocal")],
}

FLAGS = flags.FlagValues()
runs.define_flags(FLAGS, DEFAULT_DEPTH)
flags.DEFINE_list("study", list(STUDIES), f"Studies, comma separated: {', '.join(STUDIES)}.", flag_values=FLAGS)
flags.DEFINE_integer("depth", None, f"ResNet depth of the trained studies (default: {DEFAULT_DEPTH}).",
                     flag_values=FLAGS)
flags.DEFINE_list("grad_depths", None, "Depths of the gradient-flow probe (default 20,56,110; smoke 8,14).",
                  flag_values=FLAGS)
flags.DEFINE_integer("grad_batch", None, "Images in the gradient-flow batch (default 128; smoke 16).", lower_bound=2,
                     flag_values=FLAGS)
flags.DEFINE_integer("bn_devices", 2, "Devices of the bn study (paper: 2 GPUs); simulated on a CPU.", lower_bound=1,
                     flag_values=FLAGS)


# ---------------------------------------------------------------------------------------
# Gradient flow at initialisation.


def network_order(path: Sequence[str]) -> tuple:
    """Sort key putting conv paths in the order the network applies them: the stem, then
    stage by stage and block by block *numerically* (block10 after block9, where a plain
    string sort would not), conv1 < conv2 < conv3 < proj_conv inside a block."""
    parts = tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)) for part in path)
    return (0 if path[0].startswith("stem") else 1, parts)


def conv_paths(params: Any) -> list[tuple[str, ...]]:
    """Module paths of every convolution (every 4-d kernel) in network order."""
    import flax

    flat = flax.traverse_util.flatten_dict(params)
    return sorted((k[:-1] for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4), key=network_order)


def probe_batch(data=None, batch: int = 128):
    """`batch` normalised training images and labels, as the trainer normalises them: the
    first images of `data.train_split` (a config's data section; None: random 32x32 images).
    Returns (float32 [B,H,W,C], int32 [B])."""
    from . import analysis_common

    if data is None:
        data = runs.make_run("probe", "resnet20,synthetic").config().data
    return analysis_common.training_examples(data, batch)


def gradient_profile(model_name: str, images, labels, seed: int = 0, **model_overrides) -> dict:
    """One net at initialisation: per conv layer, ||d loss / d kernel|| and the std of its
    output, on one batch in train mode (BN uses the batch's statistics, as in training).

    Returns:
      {"name", "skip", "depth", "layers" (conv module paths, network order), "grad_norms",
      "activation_scales" (one float per conv), "loss"}.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from resnet_jax import models, steps

    model = models.create(model_name, num_classes=10, family="cifar", **model_overrides)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *images.shape[1:])), train=False))()
    paths = conv_paths(variables["params"])
    is_conv = lambda module, method: isinstance(module, nn.Conv) and method == "__call__"  # noqa: E731

    @jax.jit
    def probe(params, batch_stats, images, labels):
        def loss_fn(params):
            # Stochastic depth and shortcut dropout draw from the seed: one fixed training pass.
            logits, state = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                        mutable=["batch_stats", "intermediates"], capture_intermediates=is_conv,
                                        rngs={"dropout": jax.random.PRNGKey(seed), "depth": jax.random.PRNGKey(seed)})
            loss = steps.cross_entropy(logits, labels).mean()
            return loss, state["intermediates"]

        (loss, captured), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

        def at(tree, path):
            for key in path:
                tree = tree[key]
            return tree

        # Reduced here: the activations of a 110-layer net at batch 128 are ~1 GB.
        grad_norms = jnp.stack([jnp.linalg.norm(at(grads, p)["kernel"]) for p in paths])
        scales = jnp.stack([jnp.std(at(captured, p)["__call__"][0].astype(jnp.float32)) for p in paths])
        return loss, grad_norms, scales

    loss, grad_norms, scales = jax.device_get(probe(variables["params"], variables["batch_stats"],
                                                    jnp.asarray(images), jnp.asarray(labels)))
    kind, depth = re.match(r"([a-z]+)(\d+)", model_name).groups()
    return {"name": f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}", "skip": kind == "resnet",
            "depth": int(depth), "layers": ["/".join(p) for p in paths], "grad_norms": [float(v) for v in grad_norms],
            "activation_scales": [float(v) for v in scales], "loss": float(loss)}


def gradient_flow(depths: Sequence[int] = (20, 56, 110), batch: int = 128, data=None, seed: int = 0,
                  kinds: Sequence[str] = ("plain", "resnet")) -> list[dict]:
    """`gradient_profile` of plain and residual CIFAR nets of every depth, on one batch of
    `data` (see `probe_batch`), the same initialisation seed for every net; plotted by
    `plots.gradient_flow_png`."""
    images, labels = probe_batch(data, batch)
    return [gradient_profile(f"{kind}{depth}", images, labels, seed) for depth in depths for kind in kinds]


def describe_profiles(profiles: list[dict]) -> list[str]:
    """Table rows and plain-words findings for the gradient-flow profiles."""
    out = ["| net | conv layers | loss at init | ‖∂L/∂W‖ first conv | ‖∂L/∂W‖ last conv | first / last | "
           "max / min over layers | activation std first → last |", "|" + "---|" * 8]
    for p in profiles:
        g, a = p["grad_norms"], p["activation_scales"]
        out.append(f"| {p['name']} | {len(g)} | {p['loss']:.3f} | {g[0]:.3g} | {g[-1]:.3g} | {g[0] / g[-1]:.3g} | "
                   f"{max(g) / min(g):.3g} | {a[0]:.3g} → {a[-1]:.3g} |")
    out.append("")
    ratio = lambda p: p["grad_norms"][0] / p["grad_norms"][-1]  # noqa: E731
    spread = lambda p: max(p["grad_norms"]) / min(p["grad_norms"])  # noqa: E731
    by_key = {(p["skip"], p["depth"]): p for p in profiles}
    for depth in sorted({p["depth"] for p in profiles}):
        plain, res = by_key.get((False, depth)), by_key.get((True, depth))
        if plain and res:
            out.append(f"- depth {depth}: first/last-layer gradient-norm ratio plain {ratio(plain):.3g} vs residual "
                       f"{ratio(res):.3g}; max/min over layers plain {spread(plain):.3g} vs residual {spread(res):.3g}.")
    plains = sorted((p for p in profiles if not p["skip"]), key=lambda p: p["depth"])
    if len(plains) > 1:
        first, last = plains[0], plains[-1]
        r0, r1 = ratio(first), ratio(last)
        trend = f"({first['name']} {r0:.3g}, {last['name']} {r1:.3g})"
        if r1 < r0 / 2:
            word = ("**vanishing**: in plain nets the first layers' gradients shrink relative to the last ones as "
                    f"depth grows {trend}")
        elif r1 > 2 * r0:
            word = ("**not vanishing but exploding toward the input**: in plain nets with BN the first layers' "
                    f"gradients grow relative to the last ones as depth grows {trend}. He et al. (Sec. 4.1) rule "
                    "out vanishing gradients with BN, as seen here; the growth toward the input is the gradient "
                    "explosion that mean-field theory predicts for deep BN nets without skips (Yang et al., ICLR 2019)")
        else:
            word = f"**no clear depth trend** in the plain nets' first/last gradient ratio {trend}"
        out.append(f"- Plain nets: {word}.")
    return out


# ---------------------------------------------------------------------------------------
# Trained studies.


def bn_devices_plan(requested: int) -> tuple[int, str]:
    """(devices the bn study runs on, or 0 when it cannot run here; a note for the table)."""
    import jax

    have, backend = jax.device_count(), jax.default_backend()
    if have > 1:
        return have, f"{have} {backend} devices"
    if backend == "cpu" and requested > 1:
        return requested, (f"{requested} simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count="
                           f"{requested}, in each run's command)")
    return 0, (f"only 1 {backend} device is visible: per-device BN would be the same computation as sync BN, so the "
               "study was not run")


def plan(studies: Sequence[str], schedule: str, depth: int, seeds: int, data: str | None,
         bn_devices: int) -> list[runs.RunSpec]:
    """The runs of the trained studies, without duplicates (the shared baseline)."""
    source, data_overrides = runs.parse_data(data)
    variant = f"resnet{depth},{schedule}" + (f",{source}" if source else "")
    by_name: dict[str, tuple[str, int, list[str]]] = {}
    for study in studies:
        for _, name in STUDY_VARIANTS.get(study, []):
            for seed in range(seeds):
                devices = f"_{bn_devices}dev" if study == "bn" else ""
                by_name.setdefault(f"resnet{depth}_{name}{devices}_seed{seed}", (name, seed, []))[2].append(study)
    return [runs.make_run(run_name, variant, {**data_overrides, **VARIANTS[name], **({"train.seed": seed} if seed else {})},
                          devices=bn_devices if name.startswith("bn") else 0, variant_name=name,
                          studies=tuple(in_studies), type="resnet", depth=depth)
            for run_name, (name, seed, in_studies) in by_name.items()]


def param_count(model_name: str, **overrides) -> int:
    import jax
    import jax.numpy as jnp

    from resnet_jax import models

    model = models.create(model_name, family="cifar", **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def study_section(study: str, variants: list[tuple[str, list[dict]]], headline: str, note: str | None) -> list[str]:
    """Markdown: one study's table (one row per variant) and what differs beyond the noise."""
    out = [f"## {study}", "", *([f"Devices: {note}.", ""] if note else []),
           f"| variant | runs | params | train error % | {headline} error % | Δ {headline} vs first |",
           "|" + "---|" * 6]
    base, lines = None, []
    for label, rows in variants:
        ok = [r for r in rows if not r.get("failed") and r["train_error"] is not None]
        delta = "—"
        if base is None:
            base = (label.split(":")[0], ok)
        elif ok and base[1]:
            short = label.split(":")[0]
            text, diff, noise = runs.compare(base[0], base[1], short, ok, f"{headline}_error", f"{headline}_examples")
            ttext, tdiff, tnoise = runs.compare(base[0], base[1], short, ok, "train_error", "train_error_images")
            within = lambda d, n: "within the noise" if abs(d) <= n else ("**better**" if d < 0 else "**worse**")  # noqa: E731
            delta = f"{100 * diff:+.2f} (noise ±{100 * noise:.2f})"
            lines.append(f"- {short} vs {base[0]}: {headline} error {within(diff, noise)} ({text}); training error "
                         f"{within(tdiff, tnoise)} ({ttext}).")
        params = rows[0].get("params") if rows else None
        out.append(f"| {label} | {', '.join(r['name'] for r in rows)} | {params:,} | "
                   f"{runs.pct(*runs.mean_std([r['train_error'] for r in ok])[:2])} | "
                   f"{runs.pct(*runs.mean_std([r.get(f'{headline}_error') for r in ok])[:2])} | {delta} |"
                   if params else f"| {label} | — | — | — | — | — |")
    return out + [""] + lines + [""]


def run_ablation(workdir: str, *, schedule: str = "paper", studies: Sequence[str] = STUDIES, seeds: int = 1,
                 data: str | None = None, depth: int | None = None, grad_depths: Sequence[int] | None = None,
                 grad_batch: int | None = None, bn_devices: int = 2, concurrent: int | str = 1,
                 calibration: str = "", budget_s: float = 0, records: Sequence[str] = (),
                 command: str = "python -m experiments.skip_ablation",
                 log: Callable[[str], None] = print) -> tuple[list[dict], dict[str, str]]:
    """Trains what is missing, probes gradient flow, then writes table.md, results.json, PNGs.

    Args:
      workdir: the experiment's folder (one workdir per run inside).
      schedule, studies, seeds, data, depth, grad_depths, grad_batch, bn_devices: see the flags.
      concurrent, calibration, budget_s, records: how the runs share the machine and where
        earlier records are (experiments.runs.train_all).
      command: how it was launched, for table.md.
      log: where progress lines go.

    Returns:
      (rows of results.json, {run name: why it is left for the next invocation}).
    """
    studies = [s.strip() for s in studies if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise UserError(f"--study: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STUDIES)}")
    depth = runs.parse_depths([depth] if depth else None, [DEFAULT_DEPTH[schedule]], "--depth")[0]
    grad_depths = runs.parse_depths([str(d) for d in grad_depths] if grad_depths else None,
                                    DEFAULT_GRAD_DEPTHS[schedule], "--grad_depths")
    grad_batch = grad_batch or DEFAULT_GRAD_BATCH[schedule]
    runs.parse_data(data)  # a bad --data fails here, before JAX loads
    concurrent, calibrated = runs.sharing(str(concurrent), calibration, budget_s)
    records = runs.parse_records(records)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    runs.check_experiment(workdir, {"experiment": "skip_ablation", "schedule": schedule, "data": data or ""})
    started, start = datetime.datetime.now().isoformat(timespec="seconds"), time.time()
    machine_line = runs.machine_line(in_process=concurrent == 1)
    log(f"skip_ablation: studies {studies}, {schedule} schedule, ResNet-{depth}, {seeds} seed(s), "
        f"data {data or 'default'}; {machine_line}")
    trained = [s for s in studies if s in STUDY_VARIANTS]
    bn_devices, bn_note = bn_devices_plan(bn_devices) if "bn" in trained else (0, None)
    planned = plan([s for s in trained if s != "bn" or bn_devices], schedule, depth, seeds, data, bn_devices)
    outcome = runs.train_in(workdir, planned, concurrent=concurrent, calibration=calibrated, records_in=records,
                            budget_s=budget_s, log=log)
    rows = []
    for run in [r for r in planned if r.name in outcome.done]:
        run_dir = os.path.join(workdir, run.name)
        done = outcome.done[run.name]
        model_overrides = {k.split(".", 1)[1]: v for k, v in run.overrides if k.startswith("model.") and k != "model.bn_sync"}
        rows.append({**runs.result_row(run, done, run_dir), "params": param_count(f"resnet{depth}", **model_overrides)})

    from . import plots  # matplotlib: only once there is something to draw

    headline = rows[0]["headline_split"] if rows else "test"
    sections = []
    for study in trained:
        if study == "bn" and not bn_devices:
            sections += ["## bn", "", f"Not run: {bn_note}.", ""]
            continue
        variants = [(label, [r for r in rows if r["variant_name"] == name and study in r["studies"]])
                    for label, name in STUDY_VARIANTS[study]]
        plots.study_png([(label, runs.figure_runs(group) if group else []) for label, group in variants],
                          os.path.join(workdir, f"{study}.png"), eval_name=headline,
                          title=f"{study}: ResNet-{depth} on CIFAR-10 ({schedule} schedule)")
        sections += study_section(study, variants, headline, bn_note if study == "bn" else None)
    if "gradient_flow" in studies:
        sections += gradient_flow_section(workdir, schedule, grad_depths, grad_batch, data, log)
    minutes = (time.time() - start) / 60
    head = ["# Skip-connection ablations on CIFAR-10", "",
            f"- Schedule: `{schedule}` (configs/cifar.py; `resnet-jax configs` describes it); data "
            f"`{data or 'the schedule default'}`; trained studies: ResNet-{depth}, {seeds} seed(s).",
            f"- Date: {started}; wall time of this invocation {minutes:.1f} min.",
            *([f"- Training: {runs.training_summary(rows)}."] if rows else []),
            f"- Machine: {machine_line}.", f"- Command: `{command}`", "",
            *([f"- Not yet run (the same command continues): {', '.join(outcome.left)}.", ""] if outcome.left else []),
            "Training error: running error on the augmented batches over the last 10 % of the steps; "
            f"{headline} error: the final model. Mean ± std over seeds. Noise: two binomial standard errors of "
            "the difference (plus the seeds' spread). Each run's command: `## Commands` below.", ""]
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(head + sections + (runs.commands_section(rows) if rows else [])))
    runs.save_results(os.path.join(workdir, "results.json"), rows)
    log(f"wrote {workdir}/table.md, results.json and figures ({minutes:.1f} min)")
    return rows, outcome.left


def gradient_flow_section(workdir: str, schedule: str, depths: list[int], batch: int, data_flag: str | None,
                          log: Callable[[str], None]) -> list[str]:
    """Probes, draws gradient_flow.png, writes gradient_flow.json; returns the markdown."""
    from . import plots  # matplotlib: only once there is something to draw

    source, overrides = runs.parse_data(data_flag)
    data = runs.make_run("probe", f"resnet20,{schedule}" + (f",{source}" if source else ""), overrides).config().data
    what = f"{'random' if data.source == 'synthetic' else data.name + ' training'} images ({data.source})"
    log(f"gradient flow at initialisation: depths {depths}, batch of {batch} {what}")
    profiles = gradient_flow(depths, batch, data)
    plots.gradient_flow_png(profiles, os.path.join(workdir, "gradient_flow.png"),
                              title=f"gradient flow at initialisation (batch of {batch} {what}, train-mode BN)")
    runs.write_json(os.path.join(workdir, "gradient_flow.json"), profiles)
    return ["## gradient_flow", "",
            f"At initialisation (seed 0), one batch of {batch} {what}, BN in train mode; per conv layer in network "
            "order: ‖∂L/∂kernel‖ and the std of the conv's output. Figure: `gradient_flow.png`; values: "
            "`gradient_flow.json`.", "", *describe_profiles(profiles), ""]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        if not FLAGS.workdir:
            raise UserError("--workdir is required")
        _, left = run_ablation(
            FLAGS.workdir, schedule=FLAGS.schedule, studies=FLAGS.study, seeds=FLAGS.seeds, data=FLAGS.data,
            depth=FLAGS.depth, grad_depths=FLAGS.grad_depths, grad_batch=FLAGS.grad_batch, bn_devices=FLAGS.bn_devices,
            concurrent=FLAGS.concurrent, calibration=FLAGS.calibration, budget_s=FLAGS.budget_s,
            records=FLAGS.records or (), command=runs.command_line("experiments.skip_ablation", argv),
            log=lambda line: print(line, flush=True))
    runs.exit_if_left(left)


if __name__ == "__main__":
    main()
