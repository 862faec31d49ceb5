"""The experiments' figures: He et al.'s Fig. 6, the ablation studies, gradient flow, loss
landscapes and lesions. Every function writes one PNG through `resnet_jax.figures.save_png`
(Agg backend, tight layout) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator

from resnet_jax.figures import save_png


# --------------------------------------------------------------------------- He et al. Fig. 6


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds. Seeds logged at different steps (or cut short) are interpolated onto
    the densest seed's steps within the range every seed covers, so the mean never mixes
    a finished run with an unfinished one."""
    curves = [(np.asarray(s, float), np.asarray(v, float)) for s, v in curves if len(s)]
    if not curves:
        return np.array([]), np.array([])
    if len(curves) == 1:
        return curves[0]
    if all(len(s) == len(curves[0][0]) and np.array_equal(s, curves[0][0]) for s, _ in curves):
        return curves[0][0], np.mean([v for _, v in curves], axis=0)
    start = max(s.min() for s, _ in curves)
    stop = min(s.max() for s, _ in curves)
    grid = max((s for s, _ in curves), key=len)
    grid = grid[(grid >= start) & (grid <= stop)]
    return grid, np.mean([np.interp(grid, s, v) for s, v in curves], axis=0)


def _step_scale(max_step: float) -> tuple[float, str]:
    """The paper's "iter. (1e4)" axis for full runs; smaller units for short ones."""
    if max_step >= 2e4:
        return 1e4, "iterations (×1e4)"
    if max_step >= 2e3:
        return 1e3, "iterations (×1e3)"
    return 1.0, "iterations"


def degradation_png(
    runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
    *, title: str = "plain vs residual nets on CIFAR-10 (He et al. 2015, Fig. 6)",
) -> str:
    """Replica of He et al. 2015 Fig. 6: plain nets left, ResNets right.

    One colour per depth (the same on both panels); training error thin dashed, test error
    bold solid, as in the paper. Several seeds of one (depth, skip) are averaged. The y axis
    is the paper's 0-20 % when every curve's second half fits; otherwise it zooms on the
    second halves (the initial transient above is clipped, as in the paper).

    Args:
      runs: dicts with "depth", "skip", "seed", "steps", "train_error" (fractions),
        "eval_steps", "test_error" (fractions).
      path: where to write the PNG.
      title: figure title.

    Returns:
      `path` as a string.
    """
    if not runs:
        raise ValueError("degradation_png needs at least one run")
    groups: dict[tuple[int, bool], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((int(run["depth"]), bool(run["skip"])), []).append(run)
    depths = sorted({depth for depth, _ in groups})
    colours = {depth: f"C{i % 10}" for i, depth in enumerate(depths)}
    max_step = max(
        max([0.0, *map(float, run.get("steps", []) or [])]
            + [float(s) for s in (run.get("eval_steps", []) or [])])
        for run in runs
    )
    step_scale, x_label = _step_scale(max_step)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True, sharey=True,
                             layout="constrained")
    tail_values: list[float] = []  # second halves of every curve, to set the y range
    for ax, skip in zip(axes, (False, True)):
        family = "ResNet" if skip else "plain"
        handles = []
        seed_counts = set()
        for depth in depths:
            members = groups.get((depth, skip), [])
            if not members:
                continue
            seed_counts.add(len(members))
            for steps_key, error_key, style in (
                ("steps", "train_error", dict(linestyle="--", linewidth=1.0)),
                ("eval_steps", "test_error", dict(linestyle="-", linewidth=2.2)),
            ):
                steps, errors = _mean_curve([(m.get(steps_key) or [], m.get(error_key) or [])
                                             for m in members])
                if not len(steps):
                    continue
                ax.plot(steps / step_scale, 100 * errors, color=colours[depth], **style)
                tail_values.extend((100 * errors[len(errors) // 2:]).tolist())
            handles.append(Line2D([], [], color=colours[depth], linewidth=2.2,
                                  label=f"{family}-{depth}"))
        panel_title = "residual networks" if skip else "plain networks"
        if seed_counts and max(seed_counts) > 1:
            low, high = min(seed_counts), max(seed_counts)
            panel_title += f" (mean of {low if low == high else f'{low}-{high}'} seeds)"
        if handles:
            # Depth legend plus a key for the two line styles (the paper says it in a
            # caption). Below the axes, where it cannot hide the curves' interesting ends.
            handles += [Line2D([], [], color="gray", linestyle="--", linewidth=1.0,
                               label="training error"),
                        Line2D([], [], color="gray", linestyle="-", linewidth=2.2,
                               label="test error")]
            ax.legend(handles=handles, fontsize=9, loc="upper center",
                      bbox_to_anchor=(0.5, -0.14), ncol=min(len(handles), 4), frameon=False)
        else:
            ax.text(0.5, 0.5, f"no {family} runs", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("error (%)")
    finite_tail = [v for v in tail_values if np.isfinite(v)]
    if finite_tail:
        top = max(finite_tail)
        axes[0].set_ylim(0, 20 if top <= 18 else min(100, 1.15 * top))
    axes[0].set_xlim(left=0)  # shared x: both panels start at iteration 0
    fig.suptitle(title, fontsize=12)
    return save_png(fig, path)


def study_png(
    variants: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str | os.PathLike,
    *, title: str = "ablation", eval_name: str = "test",
) -> str:
    """One ablation study: training error (left, thin dashed) and `eval_name` error (right,
    bold with markers) against step, one colour per variant; seeds averaged as in Fig. 6.

    Args:
      variants: (label, runs) pairs, the runs as for `degradation_png` ("steps",
        "train_error", "eval_steps", "test_error").
      path: where to write the PNG.
      title: figure title.
      eval_name: the evaluation split's name, for the right panel's title.

    Returns:
      `path` as a string.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    panels = ((axes[0], "steps", "train_error", dict(linestyle="--", linewidth=1.2)),
              (axes[1], "eval_steps", "test_error", dict(linestyle="-", linewidth=2.2, marker="o", markersize=4)))
    for index, (label, runs) in enumerate(variants):
        for ax, steps_key, error_key, style in panels:
            steps, errors = _mean_curve([(r.get(steps_key) or [], r.get(error_key) or []) for r in runs])
            if len(steps):
                seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
                ax.plot(steps, 100 * errors, color=f"C{index % 10}", label=label + seeds, **style)
    for ax, name in ((axes[0], "training error (running, augmented batches)"), (axes[1], f"{eval_name} error")):
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("iterations")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title, fontsize=12)
    return save_png(fig, path)


# --------------------------------------------------------------------------- gradient flow


def gradient_flow_png(
    profiles: Sequence[Mapping[str, Any]], path: str | os.PathLike,
    *, title: str = "gradient flow at initialisation",
) -> str:
    """Per-conv-layer gradient norm and activation std, plain (dashed) vs residual (solid).

    Args:
      profiles: dicts with "name" (legend label, e.g. "plain-56"), "skip", "depth",
        "grad_norms" and "activation_scales" (one value per conv layer, input to output).
      path: where to write the PNG.
      title: figure title.

    Returns:
      `path` as a string.
    """
    if not profiles:
        raise ValueError("gradient_flow_png needs at least one profile")
    depths = sorted({int(p["depth"]) for p in profiles})
    colours = {depth: f"C{i % 10}" for i, depth in enumerate(depths)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    panels = (("grad_norms", "gradient norm ‖∂L/∂W‖ (log scale)", "gradient norm per layer"),
              ("activation_scales", "activation std (log scale)", "activation scale per layer"))
    # Residual nets first, so the dashed plain lines are drawn over the solid ones.
    ordered = sorted(profiles, key=lambda p: (not p["skip"], int(p["depth"])))
    for ax, (key, y_label, panel_title) in zip(axes, panels):
        for profile in ordered:
            values = np.asarray(profile.get(key) or [], dtype=float)
            if not len(values):
                continue
            # Zeros (dead layers) cannot go on a log axis; leave gaps rather than fail.
            values = np.where(values > 0, values, np.nan)
            layers = np.arange(1, len(values) + 1)
            ax.plot(layers, values, color=colours[int(profile["depth"])],
                    linestyle="-" if profile["skip"] else "--",
                    linewidth=1.8, marker="o", markersize=2.5,
                    label=str(profile.get("name", "")))
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        if high / low < 100:
            # Under two decades matplotlib labels minor ticks as "4x10^0"; plain numbers
            # read better there.
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=8)
        ax.set_xlabel("conv layer (1 = first, input side)")
        ax.set_ylabel(y_label)
        ax.set_title(panel_title, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.08)
        ax.legend(fontsize=9, title="solid: residual, dashed: plain", title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    return save_png(fig, path)


# --------------------------------------------------------------------------- why skips help
# Loss landscapes (Li et al. 2018) and lesion studies (Veit et al. 2016): experiments/
# landscape.py and experiments/lesion.py.


def _run_style(run: Mapping[str, Any], index: int) -> dict:
    """Plain nets dashed, residual nets solid (as gradient_flow_png); one colour per run."""
    return dict(color=f"C{index % 10}", linestyle="-" if run.get("skip", True) else "--")


def landscape_2d_png(
    runs: Sequence[Mapping[str, Any]], coords: Sequence[float], path: str | os.PathLike,
    *, zmax: float | None = None, title: str = "training loss around the trained weights (Li et al. 2018)",
) -> str:
    """One row per run: a filled contour plot and a 3-D surface of the loss over the grid,
    every panel on ONE colour scale (and the surfaces on one z range), so the runs compare.

    Args:
      runs: dicts with "label", "loss" ([grid][grid], rows over the second direction b,
        columns over a) and optionally "centre" ({"loss", "error"}).
      coords: the grid's coordinates along each axis.
      path: where to write the PNG.
      zmax: losses above it are drawn at it (the plot says so); None = the largest.
      title: figure title.

    Returns:
      `path` as a string.
    """
    if not runs:
        raise ValueError("landscape_2d_png needs at least one run")
    from matplotlib.cm import ScalarMappable

    coords = np.asarray(coords, dtype=float)
    a, b = np.meshgrid(coords, coords)  # a along columns, b along rows, as the loss grids
    surfaces = [np.asarray(run["loss"], dtype=float) for run in runs]
    finite = np.concatenate([s[np.isfinite(s)] for s in surfaces])
    top = float(finite.max()) if finite.size else 1.0
    zmax = top if zmax is None else float(zmax)
    zmin = float(finite.min()) if finite.size else 0.0
    zmax = max(zmax, zmin + 1e-6)
    norm = Normalize(vmin=zmin, vmax=zmax)
    levels = np.linspace(zmin, zmax, 21)
    cmap = plt.get_cmap("viridis")

    fig = plt.figure(figsize=(11, 4.6 * len(runs)), layout="constrained")
    flat_axes = []
    for row, (run, surface) in enumerate(zip(runs, surfaces)):
        # Clipped (and non-finite) points drawn at zmax: a diverged corner stays visible.
        shown = np.where(np.isfinite(surface), np.minimum(surface, zmax), zmax)
        centre = run.get("centre") or {}
        where = (f"centre: loss {centre['loss']:.3f}, error {100 * centre['error']:.1f} %"
                 if "loss" in centre else "")
        ax = fig.add_subplot(len(runs), 2, 2 * row + 1)
        ax.contourf(a, b, shown, levels=levels, cmap=cmap, norm=norm)
        lines = ax.contour(a, b, shown, levels=levels[::2], colors="white", linewidths=0.5, alpha=0.6)
        ax.clabel(lines, levels=lines.levels[::2], fontsize=7, fmt="%.2f")
        ax.plot([0], [0], marker="*", color="red", markersize=10, linestyle="none")
        ax.set_aspect("equal")
        ax.set_xlabel("direction 1 (a)")
        ax.set_ylabel("direction 2 (b)")
        ax.set_title(f"{run.get('label', '')}\n{where}", fontsize=10)
        surface_ax = fig.add_subplot(len(runs), 2, 2 * row + 2, projection="3d")
        surface_ax.plot_surface(a, b, shown, cmap=cmap, norm=norm, linewidth=0, antialiased=True,
                                rcount=len(coords), ccount=len(coords))
        surface_ax.set_zlim(zmin, zmax)
        surface_ax.set_xlabel("a", labelpad=-2)
        surface_ax.set_ylabel("b", labelpad=-2)
        surface_ax.set_zlabel("loss", labelpad=-2)
        surface_ax.tick_params(labelsize=7, pad=0)
        surface_ax.view_init(elev=35, azim=-60)
        surface_ax.set_box_aspect(None, zoom=1.15)  # 3-D axes leave wide margins otherwise
        flat_axes += [ax, surface_ax]
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=flat_axes, shrink=0.8,
                 label="training loss (cross-entropy)")
    clipped = f"; loss above {zmax:.2f} drawn at {zmax:.2f}" if top > zmax else ""
    fig.suptitle(f"{title}\nfilter-normalised random directions, one colour scale{clipped}", fontsize=11)
    return save_png(fig, path)


def landscape_1d_png(
    runs: Sequence[Mapping[str, Any]], coords: Sequence[float], path: str | os.PathLike,
    *, zmax: float | None = None, title: str = "1-D slice of the loss landscape (Li et al. 2018)",
) -> str:
    """Loss (left) and top-1 error (right) along the first direction, through the trained
    weights: a 2-D run's row b = 0, or a 1-D run's whole line.

    Args:
      runs: dicts with "label", "loss", "error" ([grid] or [grid][grid]) and optionally
        "skip" (plain nets are dashed).
      coords: the grid's coordinates.
      path: where to write the PNG.
      zmax: the loss axis stops here (None: the largest loss).
      title: figure title.

    Returns:
      `path` as a string.
    """
    if not runs:
        raise ValueError("landscape_1d_png needs at least one run")
    coords = np.asarray(coords, dtype=float)

    def line(values):
        values = np.asarray(values, dtype=float)
        return values if values.ndim == 1 else values[values.shape[0] // 2]

    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    top = 0.0
    for index, run in enumerate(runs):
        style = _run_style(run, index)
        loss = line(run["loss"])
        top = max(top, float(np.nanmax(np.where(np.isfinite(loss), loss, np.nan))))
        loss_ax.plot(coords, loss, label=str(run.get("label", "")), linewidth=1.8, marker="o", markersize=3,
                     **style)
        error_ax.plot(coords, 100 * line(run["error"]), linewidth=1.8, marker="o", markersize=3, **style)
    ceiling = top if zmax is None else min(top, float(zmax))
    loss_ax.set_ylim(0, 1.05 * ceiling if ceiling > 0 else 1.0)
    loss_ax.set_ylabel("training loss" + (f" (axis stops at {ceiling:.2f})" if ceiling < top else ""))
    error_ax.set_ylim(0, 100)
    error_ax.set_ylabel("training error (%)")
    for ax in (loss_ax, error_ax):
        ax.axvline(0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("step along direction 1 (0 = trained weights)")
        ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=9, title="solid: residual, dashed: plain", title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    return save_png(fig, path)


def lesion_png(
    runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
    *, title: str = "lesion study (Veit et al. 2016): test error with blocks deleted",
) -> str:
    """Left, as Veit et al. Fig. 3: test error with each single block deleted, per block,
    the intact net's error as a horizontal line; blocks a plain net cannot delete (they
    change the shape) are marked with crosses on the axis. Right, as their Fig. 5(a): test
    error with k random blocks deleted, mean and standard deviation over the draws.

    Args:
      runs: dicts with "label", "skip", "baseline_error", "single" (list of {"block",
        "error" (None: not deletable)}), "random" (list of {"k", "errors"}) and optionally
        "chance_error" (1 - 1/classes).
      path: where to write the PNG.
      title: figure title.

    Returns:
      `path` as a string.
    """
    if not runs:
        raise ValueError("lesion_png needs at least one run")
    fig, (single_ax, random_ax) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    chance = [float(r["chance_error"]) for r in runs if r.get("chance_error") is not None]
    for index, run in enumerate(runs):
        style = _run_style(run, index)
        label = str(run.get("label", ""))
        blocks = np.asarray([s["block"] + 1 for s in run["single"]], dtype=float)
        errors = np.asarray([np.nan if s["error"] is None else 100 * s["error"] for s in run["single"]])
        deletable = ~np.isnan(errors)  # a line through the deletable blocks, over the gaps
        single_ax.plot(blocks[deletable], errors[deletable], marker="o", markersize=4, linewidth=1.6,
                       label=label, **style)
        single_ax.axhline(100 * run["baseline_error"], color=style["color"], linewidth=1.0, linestyle=":")
        fixed = blocks[~deletable]
        if len(fixed):
            single_ax.plot(fixed, np.full(len(fixed), 1.5), marker="x", markersize=8, linestyle="none",
                           color=style["color"], clip_on=False)
        ks = [0] + [int(r["k"]) for r in run["random"]]
        means = [100 * run["baseline_error"]] + [100 * float(np.mean(r["errors"])) for r in run["random"]]
        stds = [0.0] + [100 * float(np.std(r["errors"])) for r in run["random"]]
        random_ax.errorbar(ks, means, yerr=stds, marker="o", markersize=4, linewidth=1.6, capsize=3,
                           label=label, **style)
    for ax in (single_ax, random_ax):
        if chance:
            ax.axhline(100 * max(chance), color="gray", linewidth=0.8, linestyle="--")
            ax.text(1.0, 100 * max(chance), "chance ", transform=ax.get_yaxis_transform(), ha="right",
                    va="bottom", fontsize=8, color="gray")
        ax.set_ylim(0, 100)
        ax.set_ylabel("test error (%)")
        ax.grid(True, alpha=0.3)
    single_ax.set_xlabel("deleted block (1 = nearest the input)")
    single_ax.set_title("one block deleted (dotted: intact net; x: plain block that changes shape, "
                        "cannot be deleted)", fontsize=9)
    single_ax.xaxis.get_major_locator().set_params(integer=True)
    random_ax.set_xlabel("number of blocks deleted at random")
    random_ax.set_title("k random blocks deleted (mean ± std over draws)", fontsize=10)
    random_ax.xaxis.get_major_locator().set_params(integer=True)
    single_ax.legend(fontsize=9, title="solid: residual, dashed: plain", title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    return save_png(fig, path)
