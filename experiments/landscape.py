"""Loss landscapes around trained weights (Li et al. 2018, "Visualizing the Loss Landscape
of Neural Nets"), for plain vs residual nets side by side.

    python -m experiments.landscape --workdir=/tmp/an_plain20 --workdir=/tmp/an_resnet20 \\
        --out=/tmp/landscape --grid=11 --examples=1000

For every workdir: two random directions (one with --dims=1) with *filter normalisation*
(Li et al. Sec. 4; tomgoldstein/loss-landscape, net_plotter.py, `--xnorm filter --xignore
biasbn`): each filter of a direction -- the output-channel slice of a conv or dense kernel,
the LAST axis of flax's HWIO / [in, out] kernels -- is rescaled to the norm of the same
filter of the trained weights; 1-D parameters (BN scales and biases, the head's bias) get
a zero direction. The training loss (mean cross-entropy, no weight-decay term) and top-1
error of `--examples` training images (drawn by --seed, not augmented) are evaluated at
every point theta + a d1 + b d2 of a --grid x --grid square of half-width --span.

BN running statistics: the checkpoint's, at every point (as Li et al., who perturb only
the weights -- `dir_type=weights` -- and evaluate in `net.eval()`). The landscape is then
that of the function the run actually computes at test time. Recomputing the statistics
per point would instead renormalise every perturbed layer, hiding most of the
perturbation's effect on scale (and make the loss depend on the batch).

The grid is one jitted sweep: the points are split over every device (jax.shard_map over
a "points" axis), each device runs its points as `lax.map` over blocks of
--points_per_block vmapped points, and every point runs the examples in batches of
--batch. Writes OUT/landscape.json, landscape_2d.png (contour + 3-D surface per run, one
colour scale) and landscape_1d.png (the b = 0 slice).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import analysis_common as common
from resnet_jax.errors import UserError

FLAGS = flags.FlagValues()  # the module's own: the analyses can share a process (tests)
flags.DEFINE_multi_string("workdir", None, "A trained run (repeat for several, e.g. plain and residual).",
                          flag_values=FLAGS)
flags.DEFINE_string("out", None, "Where landscape.json and the PNGs go.", flag_values=FLAGS)
flags.DEFINE_integer("grid", 21, "Points per axis (odd, so the grid passes through the trained weights).",
                     flag_values=FLAGS)
flags.DEFINE_float("span", 1.0, "The grid covers [-span, span] in each direction's units.", flag_values=FLAGS)
flags.DEFINE_integer("examples", 1000, "Training images the loss is averaged over (0 = the whole split).",
                     flag_values=FLAGS)
flags.DEFINE_integer("dims", 2, "2: a grid over two directions; 1: a line along one.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the directions and of the choice of examples.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 500, "Examples per forward pass at a grid point.", flag_values=FLAGS)
flags.DEFINE_integer("points_per_block", 1, "Grid points vmapped together on a device (more: faster on an "
                     "accelerator, more memory).", flag_values=FLAGS)
flags.DEFINE_string("checkpoint", "latest", "latest, best or a step number.", flag_values=FLAGS)
flags.DEFINE_float("zmax", 0.0, "Clip the plotted loss at this value (0 = the largest loss on the grids, "
                   "at most 5 x the largest centre loss).", flag_values=FLAGS)


# ---------------------------------------------------------------------------------------
# Directions.


def filter_normalized_direction(params: Any, rng: np.random.Generator) -> Any:
    """A Gaussian direction in parameter space, filter-normalised to `params`.

    Every array with more than one dimension is a conv or dense kernel whose LAST axis
    indexes its filters (output channels): direction[..., j] is rescaled to the norm of
    params[..., j]. Arrays of one dimension (BN scale/bias, biases) get zeros, as Li et
    al.'s `ignore='biasbn'`.

    Args:
      params: the trained parameters (a pytree of arrays).
      rng: numpy generator; the direction depends on it alone (not on the device).

    Returns:
      A pytree like `params` (float32 numpy arrays).
    """

    def one(weights):
        weights = np.asarray(weights, np.float64)
        if weights.ndim <= 1:
            return np.zeros(weights.shape, np.float32)
        direction = rng.standard_normal(weights.shape)
        axes = tuple(range(weights.ndim - 1))
        norm = lambda x: np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True))
        return (direction * norm(weights) / (norm(direction) + 1e-10)).astype(np.float32)

    return jax.tree.map(one, params)


# ---------------------------------------------------------------------------------------
# The sweep.


def grid_points(grid: int, span: float, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """The axis coordinates [grid] and the points [grid**dims, dims], row-major in (b, a):
    point i * grid + j is (a = coords[j], b = coords[i])."""
    if grid < 1 or grid % 2 == 0:
        raise ValueError(f"grid must be odd (to pass through the trained weights), got {grid}")
    coords = np.linspace(-span, span, grid).astype(np.float32)
    coords[grid // 2] = 0.0  # exactly the trained weights (linspace may leave 1e-17 there)
    if dims == 1:
        return coords, coords[:, None]
    b, a = np.meshgrid(coords, coords, indexing="ij")
    return coords, np.stack([a.ravel(), b.ravel()], axis=1)


def sweep(model: Any, variables: dict, directions: list, points: np.ndarray, inputs: np.ndarray,
          labels: np.ndarray, *, batch: int = 500, points_per_block: int = 1,
          timing: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and error at theta + sum_k points[:, k] * directions[k], in one jitted call.

    Args:
      model: the flax model (evaluated with train=False: the checkpoint's BN statistics).
      variables: {"params", "batch_stats"} of the trained run.
      directions: one pytree like variables["params"] per column of `points`.
      points: [P, dims] coefficients.
      inputs: normalised images [N, H, W, C]; labels: [N].
      batch: examples per forward pass.
      points_per_block: points vmapped together inside a device's `lax.map`.
      timing: if given, receives "compile_seconds" and "sweep_seconds".

    Returns:
      (loss [P], error [P]) as numpy arrays.
    """
    devices = np.asarray(jax.devices())
    mesh = Mesh(devices, ("points",))
    count = len(points)
    padded = -(-count // len(devices)) * len(devices)
    coefficients = np.concatenate([points, np.zeros((padded - count, points.shape[1]), np.float32)])
    x, y, mask = common.batched(inputs, labels, batch)

    def at_point(theta, batch_stats, dirs, x, y, mask, c):
        params = jax.tree.map(lambda w, *d: w + sum(c[k] * d[k] for k in range(len(d))), theta, *dirs)
        return common.loss_and_error(model, {"params": params, "batch_stats": batch_stats}, x, y, mask)

    def per_device(theta, batch_stats, dirs, x, y, mask, c):
        # lax.map keeps one block of points' activations alive at a time.
        return jax.lax.map(lambda ci: at_point(theta, batch_stats, dirs, x, y, mask, ci), c,
                           batch_size=min(points_per_block, len(c)))

    mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) * 6 + (P("points"),),
                                   out_specs=(P("points"), P("points")), check_vma=False))
    replicated = NamedSharding(mesh, P())
    put = lambda tree: jax.device_put(tree, replicated)
    args = (put(variables["params"]), put(variables["batch_stats"]), put(list(directions)), put(x), put(y),
            put(mask), jax.device_put(coefficients, NamedSharding(mesh, P("points"))))
    start = time.perf_counter()
    compiled = mapped.lower(*args).compile()
    compiled_at = time.perf_counter()
    loss, error = jax.device_get(compiled(*args))
    if timing is not None:
        timing.update(compile_seconds=compiled_at - start, sweep_seconds=time.perf_counter() - compiled_at)
    return np.asarray(loss)[:count], np.asarray(error)[:count]


def landscape(run: common.Run, *, grid: int, span: float, dims: int, examples: int, seed: int,
              batch: int = 500, points_per_block: int = 1) -> dict:
    """One run's landscape: directions, sweep and the numbers landscape.json keeps.

    Returns:
      {"workdir", "label", "model", "step", "examples", "loss", "error" (lists: [grid] for
      dims=1, [grid][grid] rows over b for dims=2), "centre": {"loss", "error"},
      "direction_norms" (global L2 norm of each direction), "compile_seconds", "seconds" (the
      sweep itself)}.
    """
    images, labels = common.subset(*run.load(run.config.data.train_split), examples, seed)
    rng = np.random.default_rng(seed)
    directions = [filter_normalized_direction(run.variables["params"], rng) for _ in range(dims)]
    coords, points = grid_points(grid, span, dims)
    timing = {}
    loss, error = sweep(run.model, run.variables, directions, points, run.normalize(images), labels,
                        batch=batch, points_per_block=points_per_block, timing=timing)
    shape = (grid,) * dims
    centre = (grid // 2,) * dims
    loss, error = loss.reshape(shape), error.reshape(shape)
    return {
        "workdir": os.path.abspath(run.workdir), "label": run.name, "model": run.config.model.name,
        "skip": bool(run.model.skip), "step": run.step, "examples": int(len(labels)),
        "loss": loss.tolist(), "error": error.tolist(),
        "centre": {"loss": float(loss[centre]), "error": float(error[centre])},
        "direction_norms": [float(math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(d))))
                            for d in directions],
        "compile_seconds": round(timing["compile_seconds"], 2), "seconds": round(timing["sweep_seconds"], 2),
    }


# ---------------------------------------------------------------------------------------
# Command line.


def _check(grid: int, span: float, dims: int, examples: int, batch: int, points_per_block: int) -> None:
    if dims not in (1, 2):
        raise UserError(f"--dims must be 1 or 2, got {dims}")
    if grid < 3 or grid % 2 == 0:
        raise UserError(f"--grid must be odd and at least 3 (so the grid passes through the trained "
                        f"weights), got {grid}")
    if not span > 0:
        raise UserError(f"--span must be positive, got {span}")
    if examples < 0 or batch < 1 or points_per_block < 1:
        raise UserError("--examples must be >= 0, --batch and --points_per_block >= 1")


def default_zmax(runs: list[dict]) -> float:
    """The loss the plots clip at: the largest loss on the grid, but no more than 5x the
    largest centre loss (a plain net's far corners would otherwise flatten every other
    run's bowl into one colour)."""
    highest = max(float(np.nanmax(np.asarray(r["loss"], np.float64))) for r in runs)
    return min(highest, 5.0 * max(r["centre"]["loss"] for r in runs))


def run(argv: list[str]) -> int:
    """The command: parses flags, sweeps every workdir, writes the JSON and PNGs."""
    common.parse_flags(FLAGS, argv, __doc__)
    if not FLAGS.workdir:
        raise UserError("--workdir is required (repeat it to compare runs), e.g. --workdir=runs/r20")
    if not FLAGS.out:
        raise UserError("--out is required: the folder for landscape.json and the PNGs")
    _check(FLAGS.grid, FLAGS.span, FLAGS.dims, FLAGS.examples, FLAGS.batch, FLAGS.points_per_block)
    if FLAGS.zmax < 0:
        raise UserError(f"--zmax must be >= 0, got {FLAGS.zmax}")
    loaded = [common.load_run(w, FLAGS.checkpoint) for w in FLAGS.workdir]  # all bad input first

    runs = []
    for one in loaded:
        result = landscape(one, grid=FLAGS.grid, span=FLAGS.span, dims=FLAGS.dims, examples=FLAGS.examples,
                           seed=FLAGS.seed, batch=FLAGS.batch, points_per_block=FLAGS.points_per_block)
        print(f"{result['label']}: {FLAGS.grid ** FLAGS.dims} points x {result['examples']} images in "
              f"{result['seconds']:.1f} s (+ {result['compile_seconds']:.1f} s to compile); centre loss {result['centre']['loss']:.4f}, error "
              f"{100 * result['centre']['error']:.2f} %; loss range {np.min(result['loss']):.3f} .. "
              f"{np.max(result['loss']):.3f}", flush=True)
        runs.append(result)
    coords, _ = grid_points(FLAGS.grid, FLAGS.span, FLAGS.dims)
    out = os.path.expanduser(FLAGS.out)
    os.makedirs(out, exist_ok=True)
    zmax = FLAGS.zmax or default_zmax(runs)
    files = write_outputs(runs, coords, out, dims=FLAGS.dims, zmax=zmax)
    summary = {
        "command": " ".join(["python -m experiments.landscape", *argv[1:]]),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "devices": f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
        "dims": FLAGS.dims, "grid": FLAGS.grid, "span": FLAGS.span, "seed": FLAGS.seed,
        "coords": coords.tolist(),
        "layout": "dims=2: loss[i][j] is at (a=coords[j], b=coords[i]); dims=1: loss[j] at a=coords[j]",
        "method": ("filter-normalised Gaussian directions (BN and bias directions zero); training loss "
                   "(mean cross-entropy, no weight decay) and top-1 error on `examples` training images "
                   "without augmentation; BN running statistics of the checkpoint"),
        "plot_zmax": zmax, "files": files, "runs": runs,
    }
    with open(os.path.join(out, "landscape.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {os.path.join(out, 'landscape.json')} and {', '.join(files.values())}", flush=True)
    return 0


def write_outputs(runs: list[dict], coords: np.ndarray, out: str, *, dims: int, zmax: float) -> dict:
    """The PNGs: landscape_2d.png (dims=2) and landscape_1d.png (always)."""
    from . import plots  # matplotlib: only once there is something to draw

    files = {}
    if dims == 2:
        files["surface"] = "landscape_2d.png"
        plots.landscape_2d_png(runs, coords, os.path.join(out, files["surface"]), zmax=zmax)
    files["slice"] = "landscape_1d.png"
    plots.landscape_1d_png(runs, coords, os.path.join(out, files["slice"]), zmax=zmax)
    return files


def main(argv: list[str] | None = None) -> None:
    common.cli(run, argv)


if __name__ == "__main__":
    main(sys.argv)
