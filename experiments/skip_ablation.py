"""What the skip connection's details do: shortcut A/B/C, zero-init, BN mode, gradient flow.

    python -m experiments.skip_ablation --workdir=runs/ablation                      # paper
    python -m experiments.skip_ablation --workdir=runs/ablation_short --schedule=short \
        --data=npz:/work/shared/data/cifar10/cifar10.npz
    python -m experiments.skip_ablation --workdir=/tmp/abl --schedule=smoke --study=gradient_flow

Studies (--study, comma separated; all by default), each a set of ResNet-`--depth` runs
trained by `train_and_evaluate` with experiments/degradation.py's schedules, one workdir
per run, finished runs skipped and interrupted ones resumed exactly as there:

  shortcut       option A (zero-pad, the paper's CIFAR choice) vs B (projection where the
                 shape changes) vs C (projection everywhere): config.model.shortcut.
  zero_init      the last BN scale of every residual branch 1 (paper) or 0 (Goyal et al.),
                 config.model.zero_init_residual.
  bn             BN statistics over the global batch (sync) vs over each device's part (the
                 paper's per-GPU BN; 2 GPUs of 64), config.model.bn_sync. Per-device BN only
                 differs with several devices: on a 1-device CPU the study runs in a
                 subprocess with --bn_devices simulated CPU devices (XLA_FLAGS=
                 --xla_force_host_platform_device_count); on a single accelerator it is not
                 run and the table says so.
  gradient_flow  no training: at initialisation, on one batch (real training images when
                 --data gives them, else synthetic), per conv layer in network order, the
                 norm of d loss / d kernel and the std of the conv's output, in train mode
                 (batch statistics), for plain and residual nets of --grad_depths.

The baseline run (shortcut A, zero-init off, sync BN on one device) is shared by the
shortcut and zero_init studies. Outputs in WORKDIR: table.md, results.json (one row per
run), shortcut.png / zero_init.png / bn.png (training and test error curves per variant),
gradient_flow.png and gradient_flow.json.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from experiments import degradation as deg
from experiments.degradation import UsageError

STUDIES = ("shortcut", "zero_init", "bn", "gradient_flow")
DEFAULT_DEPTH = {"paper": 56, "short": 20, "smoke": 8}  # depth of the trained studies
DEFAULT_GRAD_DEPTHS = {"paper": (20, 56, 110), "short": (20, 56, 110), "smoke": (8, 14)}
DEFAULT_GRAD_BATCH = {"paper": 128, "short": 128, "smoke": 16}

# Run variants: workdir suffix -> model overrides.
VARIANTS = {
    "baseline": {},
    "shortcutB": {"shortcut": "B"},
    "shortcutC": {"shortcut": "C"},
    "zeroinit": {"zero_init_residual": True},
    "bnsync": {"bn_sync": True},
    "bnlocal": {"bn_sync": False},
}
# Study -> [(label, variant)]; the first is what the others are compared with.
STUDY_VARIANTS = {
    "shortcut": [("A: zero-pad (paper, CIFAR)", "baseline"), ("B: projection where shape changes", "shortcutB"),
                 ("C: projection everywhere", "shortcutC")],
    "zero_init": [("off: last BN scale 1 (paper)", "baseline"), ("on: last BN scale 0", "zeroinit")],
    "bn": [("sync BN (global batch)", "bnsync"), ("per-device BN", "bnlocal")],
}


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


def probe_batch(data: deg.DataSpec | str | None, batch: int, image_size: int = 32):
    """`batch` normalised training images and labels: the first ones of the training split
    for real data (per-pixel mean of the whole split subtracted, as in training), random
    images for synthetic. Returns (images float32 [B,H,W,C], labels int32 [B])."""
    import numpy as np

    from configs import cifar
    from resnet_jax.data import device as device_data
    from resnet_jax.data import sources

    if not isinstance(data, deg.DataSpec):
        data = deg.parse_data(data or "synthetic", deg.SCHEDULES["short"])
    config = cifar.get_config("resnet20").data
    config.source, config.path = data.kind, data.path
    config.image_size, config.synthetic_examples = image_size, max(batch, 2)
    arrays = sources.load_split(config, "train")
    if len(arrays.labels) < batch:
        raise UsageError(f"--grad_batch={batch} is more than the {len(arrays.labels)} training images")
    mean, std = device_data.normalization_stats(config, arrays)
    images = (arrays.images[:batch].astype(np.float32) - mean) / std
    return images, arrays.labels[:batch].astype(np.int32)


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
    import optax

    from resnet_jax import models

    model = models.create(model_name, num_classes=10, family="cifar", **model_overrides)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *images.shape[1:])), train=False))()
    paths = conv_paths(variables["params"])
    is_conv = lambda module, method: isinstance(module, nn.Conv) and method == "__call__"

    @jax.jit
    def probe(params, batch_stats, images, labels):
        def loss_fn(params):
            logits, state = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                        mutable=["batch_stats", "intermediates"], capture_intermediates=is_conv)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
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


def gradient_flow(depths: Sequence[int] = (20, 56, 110), batch: int = 128, data: deg.DataSpec | str | None = None,
                  seed: int = 0, kinds: Sequence[str] = ("plain", "resnet"), image_size: int = 32) -> list[dict]:
    """`gradient_profile` of plain and residual CIFAR nets of every depth, on one batch.

    Args:
      depths: CIFAR depths 6n+2.
      batch: images in the batch.
      data: "npz:PATH", "tfds", "synthetic" (None) or a DataSpec: where the images come from.
      seed: initialisation seed (the same for every net).
      kinds: "plain" and/or "resnet".
      image_size: of synthetic images.

    Returns:
      One profile per (depth, kind), plotted by `figures.gradient_flow_png`.
    """
    images, labels = probe_batch(data, batch, image_size)
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
    by_key = {(p["skip"], p["depth"]): p for p in profiles}
    for depth in sorted({p["depth"] for p in profiles}):
        plain, res = by_key.get((False, depth)), by_key.get((True, depth))
        if plain and res:
            ratio = lambda p: p["grad_norms"][0] / p["grad_norms"][-1]
            spread = lambda p: max(p["grad_norms"]) / min(p["grad_norms"])
            out.append(f"- depth {depth}: first/last-layer gradient-norm ratio plain {ratio(plain):.3g} vs residual "
                       f"{ratio(res):.3g}; max/min over layers plain {spread(plain):.3g} vs residual {spread(res):.3g}.")
    plains = sorted((p for p in profiles if not p["skip"]), key=lambda p: p["depth"])
    if len(plains) > 1:
        first, last = plains[0], plains[-1]
        r0 = first["grad_norms"][0] / first["grad_norms"][-1]
        r1 = last["grad_norms"][0] / last["grad_norms"][-1]
        if r1 < r0 / 2:
            word = (f"**vanishing**: in plain nets the first layers' gradients shrink relative to the last ones as "
                    f"depth grows ({first['name']} {r0:.3g}, {last['name']} {r1:.3g})")
        elif r1 > 2 * r0:
            word = (f"**not vanishing but exploding toward the input**: in plain nets with BN the first layers' "
                    f"gradients grow relative to the last ones as depth grows ({first['name']} {r0:.3g}, "
                    f"{last['name']} {r1:.3g}). He et al. (Sec. 4.1) rule out vanishing gradients with BN, as "
                    "seen here; the growth toward the input is the gradient explosion that mean-field theory "
                    "predicts for deep BN nets without skips (Yang et al., ICLR 2019)")
        else:
            word = (f"**no clear depth trend** in the plain nets' first/last gradient ratio ({first['name']} {r0:.3g}, "
                    f"{last['name']} {r1:.3g})")
        out.append(f"- Plain nets: {word}.")
    return out


# ---------------------------------------------------------------------------------------
# Trained studies.


def run_name(depth: int, variant: str, seed: int, devices: int = 1) -> str:
    suffix = f"_{devices}dev" if variant.startswith("bn") else ""
    return f"resnet{depth}_{variant}{suffix}_seed{seed}"


def param_count(model_name: str, **overrides) -> int:
    import jax
    import jax.numpy as jnp

    from resnet_jax import models

    model = models.create(model_name, family="cifar", **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def bn_devices_plan(requested: int) -> tuple[str, int, str]:
    """How the bn study runs here: ("inprocess", n, note), ("subprocess", n, note) or
    ("skip", 1, note)."""
    import jax

    have, backend = jax.device_count(), jax.default_backend()
    if have > 1:
        return "inprocess", have, f"{have} {backend} devices"
    if backend == "cpu" and requested > 1:
        return "subprocess", requested, (f"{requested} simulated CPU devices in a subprocess "
                                         f"(XLA_FLAGS=--xla_force_host_platform_device_count={requested}); "
                                         "only 1 device is visible to this process")
    return "skip", 1, (f"only 1 {backend} device is visible: per-device BN would be the same computation as sync "
                       "BN, so the study was not run")


def study_png(title: str, variants: list[tuple[str, list[dict]]], path: str) -> str:
    """Training (thin dashed) and test (bold) error against step, one colour per variant;
    several seeds are averaged over the steps they share."""
    from resnet_jax import figures  # noqa: F401  (selects the Agg backend before pyplot)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for index, (label, rows) in enumerate(variants):
        rows = [r for r in rows if not r.get("failed")]
        for ax, key, style in ((axes[0], "train", dict(linestyle="--", linewidth=1.2)),
                               (axes[1], "eval", dict(linestyle="-", linewidth=2.2, marker="o", markersize=4))):
            series = [dict(r["curves"][key]) for r in rows if r["curves"][key]]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            mean = [100 * float(np.mean([s[step] for s in series])) for step in steps]
            ax.plot(steps, mean, color=f"C{index}", label=label, **style)
    eval_name = next((r["headline_split"] for _, rows in variants for r in rows), "test")
    for ax, name in ((axes[0], "training error (running, augmented batches)"), (axes[1], f"{eval_name} error")):
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("iterations")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=12)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def study_section(study: str, depth: int, variants: list[tuple[str, str, list[dict]]], headline: str,
                  note: str | None) -> list[str]:
    out = [f"## {study}", ""]
    if note:
        out += [f"Devices: {note}.", ""]
    out += [f"| variant | runs | params | train error % | {headline} error % | Δ {headline} vs first |",
            "|" + "---|" * 6]
    base = None
    lines = []
    for label, variant, rows in variants:
        ok = [r for r in rows if not r.get("failed") and r["train_error"] is not None]
        train_mean, train_std, _ = deg.mean_std([r["train_error"] for r in ok])
        test_mean, test_std, _ = deg.mean_std([r.get(f"{headline}_error") for r in ok])
        delta = "—"
        if base is None:
            base = (label, ok)
        elif ok and base[1]:
            short, base_short = label.split(":")[0], base[0].split(":")[0]
            text, diff, noise = deg.compare(base_short, base[1], short, ok, f"{headline}_error", f"{headline}_examples")
            delta = f"{100 * diff:+.2f} (noise ±{100 * noise:.2f})"
            ttext, tdiff, tnoise = deg.compare(base_short, base[1], short, ok, "train_error", "train_error_images")
            within = lambda d, n: "within the noise" if abs(d) <= n else ("**better**" if d < 0 else "**worse**")
            lines.append(f"- {short} vs {base_short}: {headline} error {within(diff, noise)} ({text}); training error "
                         f"{within(tdiff, tnoise)} ({ttext}).")
        params = rows[0].get("params") if rows else None
        out.append(f"| {label} | {', '.join(r['name'] for r in rows) or '—'} | "
                   f"{params:,} | {deg.pct(train_mean, train_std)} | {deg.pct(test_mean, test_std)} | {delta} |"
                   if params else f"| {label} | — | — | — | — | — |")
    return out + [""] + lines + [""]


# ---------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = deg._Parser(prog="python -m experiments.skip_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--schedule", choices=sorted(deg.SCHEDULES), default="paper")
    parser.add_argument("--data", default=None, help="tfds | npz:PATH | synthetic (default: tfds; synthetic for smoke)")
    parser.add_argument("--study", default=",".join(STUDIES), help=f"comma-separated: {', '.join(STUDIES)}")
    parser.add_argument("--depth", type=int, default=None, help="ResNet depth of the trained studies "
                        f"(default: {DEFAULT_DEPTH})")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--grad_depths", default=None, help="depths of the gradient-flow probe (default 20,56,110)")
    parser.add_argument("--grad_batch", type=int, default=None, help="images in the gradient-flow batch (default 128)")
    parser.add_argument("--bn_devices", type=int, default=2,
                        help="simulated CPU devices for the bn study on a 1-device CPU (paper: 2 GPUs)")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)  # the bn study's subprocess
    args = parser.parse_args(argv)
    studies = [s.strip() for s in args.study.split(",") if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise UsageError(f"--study: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STUDIES)}")
    args.studies = studies
    schedule = deg.SCHEDULES[args.schedule]
    args.depth = args.depth or DEFAULT_DEPTH[args.schedule]
    deg.parse_depths(str(args.depth), schedule, "--depth")
    args.grad_depths = deg.parse_depths(args.grad_depths, schedule, "--grad_depths") if args.grad_depths else list(
        DEFAULT_GRAD_DEPTHS[args.schedule])
    args.grad_batch = args.grad_batch or DEFAULT_GRAD_BATCH[args.schedule]
    if args.seeds < 1 or args.grad_batch < 2 or args.bn_devices < 1:
        raise UsageError("--seeds and --bn_devices must be at least 1, --grad_batch at least 2")
    args.data_spec = deg.parse_data(args.data, schedule)
    return args


def run_ablation(args: argparse.Namespace, argv: Sequence[str], log: Callable[[str], None] = print) -> dict:
    schedule = deg.SCHEDULES[args.schedule]
    data = args.data_spec
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    deg.check_experiment(workdir, {"experiment": "skip_ablation", "schedule": schedule.name, "data": str(data)})
    started = datetime.datetime.now().isoformat(timespec="seconds")
    start = time.time()
    machine_line = deg.machine()
    trained = [s for s in args.studies if s in STUDY_VARIANTS]

    if args._child:  # the bn study on simulated devices: train, leave the report to the parent
        import jax

        if jax.device_count() != args.bn_devices:
            raise UsageError(f"the bn study asked for {args.bn_devices} devices and sees {jax.device_count()}")
        train_runs(args, schedule, data, workdir, ["bn"], "inprocess", log)
        return {}
    log(f"skip_ablation: studies {args.studies}, {schedule.name} schedule, ResNet-{args.depth}, {args.seeds} seed(s), "
        f"data {data}; {machine_line}")

    bn_mode, bn_note = None, None
    if "bn" in trained:
        bn_mode, devices, bn_note = bn_devices_plan(args.bn_devices)
        args.bn_devices = devices
        if bn_mode == "subprocess":
            flags = os.environ.get("XLA_FLAGS", "")
            env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
            child = [sys.executable, "-m", "experiments.skip_ablation", *argv, "--_child", "--study=bn",
                     f"--bn_devices={devices}", f"--depth={args.depth}"]
            log(f"bn study: {bn_note}")
            code = subprocess.call(child, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if code:
                raise ChildFailed(code)
    rows = train_runs(args, schedule, data, workdir, [s for s in trained if not (s == "bn" and bn_mode != "inprocess")],
                      bn_mode, log)
    if bn_mode == "subprocess":
        rows += collect_runs(args, schedule, data, workdir, ["bn"])

    from resnet_jax import figures

    headline = deg._split_names(schedule.eval_splits[data.kind])[0]
    sections = []
    for study in trained:
        if study == "bn" and bn_mode == "skip":
            sections += ["## bn", "", f"Not run: {bn_note}.", ""]
            continue
        variants = [(label, variant, [r for r in rows if r["variant"] == variant]) for label, variant in
                    STUDY_VARIANTS[study]]
        study_png(f"{study}: ResNet-{args.depth} on CIFAR-10 ({schedule.name} schedule)",
                  [(label, group) for label, _, group in variants], os.path.join(workdir, f"{study}.png"))
        sections += study_section(study, args.depth, variants, headline, bn_note if study == "bn" else None)

    if "gradient_flow" in args.studies:
        log(f"gradient flow at initialisation: depths {args.grad_depths}, batch {args.grad_batch}, data {data}")
        profiles = gradient_flow(args.grad_depths, args.grad_batch, data,
                                 image_size=schedule.image_size if data.kind == "synthetic" else 32)
        figures.gradient_flow_png(profiles, os.path.join(workdir, "gradient_flow.png"),
                                  title=f"gradient flow at initialisation (batch of {args.grad_batch} "
                                        f"{'CIFAR-10 training' if data.kind != 'synthetic' else 'random'} images, "
                                        "train-mode BN)")
        deg._write_json(os.path.join(workdir, "gradient_flow.json"), profiles)
        sections += ["## gradient_flow", "",
                     f"At initialisation (seed 0), one batch of {args.grad_batch} "
                     f"{'training images of ' + str(data) if data.kind != 'synthetic' else 'random images'}, BN in "
                     "train mode; per conv layer in network order: ‖∂L/∂kernel‖ and the std of the conv's output. "
                     "Figure: `gradient_flow.png`; values: `gradient_flow.json`.", ""]
        sections += describe_profiles(profiles) + [""]

    minutes = (time.time() - start) / 60
    head = ["# Skip-connection ablations on CIFAR-10", "",
            f"- Schedule: `{schedule.name}` — {schedule.summary}." if trained else
            f"- Schedule: `{schedule.name}` (no training: gradient flow only).",
            f"- Trained studies: ResNet-{args.depth}, {args.seeds} seed(s); data `{data}`, training split "
            f"`{schedule.train_split[data.kind]}`, evaluated on `{schedule.eval_splits[data.kind]}`.",
            f"- Date: {started}; wall time of this invocation {minutes:.1f} min.",
            *([f"- Training: {deg.training_summary(rows)}."] if rows else []),
            f"- Machine: {machine_line}.",
            f"- Command: `{deg.command_line('experiments.skip_ablation', argv)}`", "",
            "Training error: running error on the augmented batches over the last 10 % of the steps; "
            f"{headline} error: the final model. Mean ± std over seeds. Noise: two binomial standard errors of "
            "the difference (plus the seeds' spread).", ""]
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(head + sections))
    deg._write_json(os.path.join(workdir, "results.json"), [{k: v for k, v in r.items() if k != "curves"} for r in rows])
    log(f"wrote {workdir}/table.md, results.json and figures ({minutes:.1f} min)")
    return {"rows": rows, "workdir": workdir}


class ChildFailed(Exception):
    def __init__(self, code: int):
        super().__init__(f"the bn study's subprocess exited with code {code}")
        self.code = code


def _plan(args, studies, devices: int) -> list[tuple[str, str, int, list[str]]]:
    """[(run name, variant, seed, [studies])] without duplicates (the shared baseline)."""
    plan: dict[str, tuple[str, int, list[str]]] = {}
    for study in studies:
        for _, variant in STUDY_VARIANTS[study]:
            for seed in range(args.seeds):
                name = run_name(args.depth, variant, seed, devices)
                plan.setdefault(name, (variant, seed, []))[2].append(study)
    return [(name, variant, seed, studies) for name, (variant, seed, studies) in plan.items()]


def _row(args, schedule, data, workdir, name, variant, seed, studies, done) -> dict:
    model = f"resnet{args.depth}"
    config = deg.make_config(model, seed, schedule, data, **VARIANTS[variant])
    extra = {"studies": studies, "variant": variant, "type": "resnet", "depth": args.depth,
             "params": param_count(model, **{k: v for k, v in VARIANTS[variant].items() if k != "bn_sync"}),
             **{k: config.model[k] for k in ("shortcut", "zero_init_residual", "bn_sync")}}
    if variant.startswith("bn"):
        extra["devices"] = args.bn_devices
    return deg.run_row(name, done, os.path.join(workdir, name), config, extra)


def train_runs(args, schedule, data, workdir, studies, bn_mode, log) -> list[dict]:
    plan = _plan(args, studies, args.bn_devices)
    rows = []
    for index, (name, variant, seed, run_studies) in enumerate(plan, 1):
        config = deg.make_config(f"resnet{args.depth}", seed, schedule, data, **VARIANTS[variant])
        done = deg.run_or_skip(f"[{index}/{len(plan)}] {name}", config, os.path.join(workdir, name), log)
        rows.append(_row(args, schedule, data, workdir, name, variant, seed, run_studies, done))
    return rows


def collect_runs(args, schedule, data, workdir, studies) -> list[dict]:
    """Rows of runs trained elsewhere (the bn subprocess): their done.json, or failed."""
    rows = []
    for name, variant, seed, run_studies in _plan(args, studies, args.bn_devices):
        run_dir = os.path.join(workdir, name)
        done = deg._read_json(os.path.join(run_dir, "done.json")) or deg._read_json(
            os.path.join(run_dir, "failed.json")) or {"failed": "did not finish"}
        rows.append(_row(args, schedule, data, workdir, name, variant, seed, run_studies, done))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        from resnet_jax import train
        from resnet_jax.errors import UserError

        try:
            run_ablation(args, argv, log=lambda line: print(line, flush=True))
        except UserError as error:
            deg.fail(str(error))
        except train.Preempted as error:
            deg.fail(str(error), deg.PREEMPTED_EXIT)
        except ChildFailed as error:
            deg.fail(str(error), error.code)
    except UsageError as error:
        deg.fail(str(error))
    except KeyboardInterrupt:
        deg.fail("interrupted; run the same command again to resume", deg.PREEMPTED_EXIT)


if __name__ == "__main__":
    main()
