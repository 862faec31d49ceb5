"""Figures a person would rather look at than numbers; every function writes one PNG.

All functions take plain numpy arrays / dicts (no jax), write the PNG at `path` (creating
its folder), close the figure, and return the path as a string. Layout uses constrained
layout plus `bbox_inches="tight"` so that nothing is clipped whatever the label lengths.

The Agg backend is selected at import: these run on headless training machines, and an
interactive backend there either fails or opens windows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

_DPI = 120
# Eval splits get fixed colours so "test" is the same colour in every curves figure.
_SPLIT_COLOURS = {"train": "tab:blue", "test": "tab:red", "val": "tab:green",
                  "validation": "tab:green"}


def _save(fig: plt.Figure, path: str | os.PathLike) -> str:
    """Writes `fig` to `path` as PNG (making the folder) and frees it."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def _note_figure(message: str, path: str | os.PathLike, title: str) -> str:
    """A small PNG that says why there is nothing to plot (so reports never have holes)."""
    fig, ax = plt.subplots(figsize=(5, 2), layout="constrained")
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, transform=ax.transAxes)
    return _save(fig, path)


def _shorten(name: str, width: int) -> str:
    """Truncates a label so long class names cannot push tick labels off the figure."""
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def _displayable(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Makes one image imshow-ready: [H, W] or [H, W, 3] floats in [0, 1] and a colormap.

    uint8 images are divided by 255. Float images already in [0, 1] are kept (so their
    brightness means something); anything else (e.g. mean-subtracted network inputs) is
    min-max scaled per image, which is the only scale that always shows the content.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an [H, W], [H, W, 1] or [H, W, 3] image, got {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float32) / 255.0
    else:
        image = image.astype(np.float32)
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if low < 0.0 or high > 1.0:
            image = (image - low) / max(high - low, 1e-12)
    image = np.clip(np.nan_to_num(image), 0.0, 1.0)
    return image, ("gray" if image.ndim == 2 else None)


# --------------------------------------------------------------------------- confusion


def confusion_matrix_png(
    cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
    *, title: str = "confusion matrix",
) -> str:
    """Confusion matrix: colour is the row-normalised rate, cells are annotated with counts.

    Colouring by the fraction of each true class (not raw counts) keeps rare classes
    visible when the classes are imbalanced; the counts in the cells keep the absolute
    numbers. Annotations are skipped above 20 classes, where they would be unreadable.

    Args:
      cm: [C, C] counts; rows are true classes, columns predicted classes.
      class_names: C names used as tick labels (truncated and rotated when long).
      path: where to write the PNG.
      title: figure title.

    Returns:
      `path` as a string.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be square [C, C], got shape {cm.shape}")
    num_classes = cm.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class matrix")
    row_totals = cm.sum(axis=1, keepdims=True)
    # Classes with no examples get an all-zero row instead of a 0/0 NaN.
    rates = np.divide(cm, row_totals, out=np.zeros(cm.shape, dtype=float),
                      where=row_totals > 0)

    annotate = num_classes <= 20
    # About half an inch per class when annotated (room for 4-digit counts), less beyond.
    # Beyond 20 classes, 0.2 in per class keeps 6.5 pt tick labels apart up to ~100 classes.
    cell = 0.55 if annotate else max(0.12, min(0.3, 20.0 / num_classes))
    side = float(np.clip(cell * num_classes + 2.5, 5.0, 24.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = ax.imshow(rates, cmap="Blues", norm=Normalize(0.0, 1.0), interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02,
                            shrink=1.0 if annotate else 0.5)
    colorbar.set_label("fraction of true class", fontsize=10)

    tick_size = 10 if num_classes <= 20 else (8 if num_classes <= 50 else 6.5)
    names = [_shorten(name, 18) for name in class_names]
    ax.set_xticks(range(num_classes))
    ax.set_yticks(range(num_classes))
    long_names = max((len(n) for n in names), default=0) > 3
    if not annotate:
        rotation, align = 90, "right"  # dense axis: vertical labels never overlap
    elif long_names:
        rotation, align = 60, "right"
    else:
        rotation, align = 0, "center"
    ax.set_xticklabels(names, fontsize=tick_size, rotation=rotation, ha=align,
                       va="center" if rotation == 90 else "top", rotation_mode="anchor")
    ax.set_yticklabels(names, fontsize=tick_size)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    total = int(cm.sum())
    accuracy = np.trace(cm) / total if total else float("nan")
    ax.set_title(f"{title}  (n={total:,}, accuracy {100 * accuracy:.2f}%)", fontsize=12)

    if annotate:
        count_size = 9 if num_classes <= 12 else 7
        for true_class in range(num_classes):
            for predicted in range(num_classes):
                count = int(cm[true_class, predicted])
                if count == 0:
                    continue  # blank zeros make the off-diagonal errors stand out
                # White text on dark cells, black on light ones, for contrast.
                colour = "white" if rates[true_class, predicted] > 0.55 else "black"
                ax.text(predicted, true_class, str(count), ha="center", va="center",
                        fontsize=count_size, color=colour)
    return _save(fig, path)


# --------------------------------------------------------------------------- mistakes


def mistakes_png(
    images: np.ndarray,
    true: Sequence[int] | np.ndarray,
    pred: Sequence[int] | np.ndarray,
    confidence: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    ncols: int = 8,
    *,
    title: str = "most confident mistakes",
) -> str:
    """A grid of misclassified images, titled "true: X / pred: Y (confidence)".

    The caller chooses and orders the examples (`metrics.most_confident_mistakes` gives the
    surest mistakes first); this function only draws them in that order.

    Args:
      images: [N, H, W, C] (C = 1 or 3) or [N, H, W]; uint8, or floats (in [0, 1] kept,
        otherwise min-max scaled per image, e.g. normalised network inputs).
      true: [N] true class indices.
      pred: [N] predicted class indices.
      confidence: [N] probability of the predicted class.
      class_names: names indexed by class.
      path: where to write the PNG.
      ncols: images per row.
      title: figure title.

    Returns:
      `path` as a string. With N = 0 the PNG says that there were no mistakes.
    """
    images = np.asarray(images)
    true, pred = np.asarray(true).astype(int), np.asarray(pred).astype(int)
    confidence = np.asarray(confidence, dtype=float)
    count = len(images)
    if not (len(true) == len(pred) == len(confidence) == count):
        raise ValueError(f"images, true, pred, confidence disagree in length: {len(images)}, "
                         f"{len(true)}, {len(pred)}, {len(confidence)}")
    if count == 0:
        return _note_figure("no misclassified examples", path, title)

    ncols = max(1, min(int(ncols), count))
    nrows = math.ceil(count / ncols)
    # 1.7 inches per cell: a 32x32 image becomes ~200 px (nearest upscaling keeps pixels
    # crisp), with room for a two-line title at 8 pt.
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.7 * ncols, 2.0 * nrows + 0.4),
                             layout="constrained", squeeze=False)
    for slot, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if slot >= count:
            continue
        image, cmap = _displayable(images[slot])
        ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(
            f"true: {_shorten(class_names[true[slot]], 14)}\n"
            f"pred: {_shorten(class_names[pred[slot]], 14)} ({confidence[slot]:.2f})",
            fontsize=8,
        )
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------- activations


def _tile(maps: np.ndarray, tile_cols: int) -> np.ndarray:
    """Tiles [k, h, w] maps into one image with 1-pixel NaN gutters (drawn as background).

    Each map is min-max scaled on its own: channels differ in scale by orders of magnitude,
    and a shared scale would show one bright channel and k-1 black ones.
    """
    count, height, width = maps.shape
    # Upscale small maps (nearest, by an integer factor) so that the 1-pixel gutter stays
    # thin next to an 8x8 stage-3 map as it is next to a 32x32 stem map.
    factor = max(1, math.ceil(32 / max(height, width)))
    if factor > 1:
        maps = maps.repeat(factor, axis=1).repeat(factor, axis=2)
        height, width = height * factor, width * factor
    tile_rows = math.ceil(count / tile_cols)
    mosaic = np.full((tile_rows * (height + 1) - 1, tile_cols * (width + 1) - 1), np.nan)
    for index in range(count):
        channel = maps[index].astype(np.float64)
        low, high = channel.min(), channel.max()
        scaled = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
        row, col = divmod(index, tile_cols)
        mosaic[row * (height + 1): row * (height + 1) + height,
               col * (width + 1): col * (width + 1) + width] = scaled
    return mosaic


def activations_png(
    images: np.ndarray,
    activations: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    channels: int = 8,
    *,
    max_images: int = 4,
    title: str = "feature maps",
) -> str:
    """Inputs and, per layer, the channel-mean map and the most active channels.

    One row per input image. For each layer two columns: the mean over all channels (what
    the layer responds to overall), and a mosaic of the `channels` channels with the largest
    mean activation over the shown images (the same channels in every row, so rows compare).

    Args:
      images: [N, H, W, C] (or [N, H, W]) network inputs; uint8 or float.
      activations: layer name -> [N, h, w, c] feature maps, in network order
        (e.g. "stem", "stage1", "stage2", "stage3").
      path: where to write the PNG.
      channels: channels shown per layer in the mosaic.
      max_images: rows drawn (the first images).
      title: figure title.

    Returns:
      `path` as a string.
    """
    images = np.asarray(images)
    if not activations:
        raise ValueError("activations is empty: nothing to draw")
    rows = min(len(images), int(max_images))
    if rows == 0:
        raise ValueError("no images given")
    layers: list[tuple[str, np.ndarray, np.ndarray, int]] = []
    for name, maps in activations.items():
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim == 3:
            maps = maps[..., None]
        if maps.ndim != 4 or len(maps) < rows:
            raise ValueError(f"activations[{name!r}] must be [N>={rows}, h, w, c], "
                             f"got {maps.shape}")
        maps = maps[:rows]
        # Most active channels over the shown images: post-ReLU, near-zero ones are dead.
        strength = np.abs(maps).mean(axis=(0, 1, 2))
        chosen = np.argsort(-strength, kind="stable")[: max(1, int(channels))]
        layers.append((str(name), maps, chosen, maps.shape[-1]))

    # Mosaic shape: at most 4 tiles across, so 8 channels is a 2x4 block.
    tile_cols = [min(4, len(chosen)) for _, _, chosen, _ in layers]
    tile_rows = [math.ceil(len(chosen) / c) for (_, _, chosen, _), c in zip(layers, tile_cols)]
    width_ratios = [1.0]
    for cols, trows in zip(tile_cols, tile_rows):
        width_ratios += [1.0, cols / trows]
    row_height = 1.6
    fig, axes = plt.subplots(
        rows, len(width_ratios), squeeze=False, layout="constrained",
        figsize=(row_height * sum(width_ratios) + 0.5, row_height * rows + 1.0),
        gridspec_kw={"width_ratios": width_ratios},
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # NaN gutters between tiles
    for row in range(rows):
        image, image_cmap = _displayable(images[row])
        axes[row, 0].imshow(image, cmap=image_cmap, vmin=0, vmax=1, interpolation="nearest")
        for layer_index, (name, maps, chosen, total_channels) in enumerate(layers):
            mean_ax = axes[row, 1 + 2 * layer_index]
            tile_ax = axes[row, 2 + 2 * layer_index]
            mean_map = maps[row].mean(axis=-1)
            mean_ax.imshow(_tile(mean_map[None], 1), cmap=cmap, vmin=0, vmax=1,
                           interpolation="nearest")
            mosaic = _tile(np.moveaxis(maps[row][..., chosen], -1, 0), tile_cols[layer_index])
            tile_ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if row == 0:
                height, width = maps.shape[1:3]
                mean_ax.set_title(f"{name}\nmean of {total_channels} ch\n{height}x{width}",
                                  fontsize=9)
                tile_ax.set_title(f"{name}\ntop {len(chosen)} channels", fontsize=9)
        if row == 0:
            axes[row, 0].set_title("input", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=12)
    fig.supxlabel("each map min-max scaled on its own (dark = lowest, yellow = highest); "
                  "channels ranked by mean |activation| over the rows shown", fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- curves


def _split_colour(split: str, fallback_index: int) -> str:
    return _SPLIT_COLOURS.get(split, f"C{(fallback_index + 3) % 10}")


def curves_png(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike,
    *, log_loss: bool | None = None, title: str = "training curves",
) -> str:
    """Loss and top-1 error (%) against step, one line per split, from metrics.jsonl records.

    Train records are drawn thin (they are per-log-window and noisy), eval records bold
    with markers (fewer points, the numbers that matter). Records lacking a key are skipped
    for that panel only, so partial records (e.g. lr-only) do no harm.

    Args:
      records: dicts with "step", "split" and some of "loss", "error" (fraction).
      path: where to write the PNG.
      log_loss: log-scale loss axis; None picks it when the loss spans over 10x.
      title: figure title.

    Returns:
      `path` as a string. With no plottable record the PNG says so.
    """
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in records:
        if "step" not in record:
            continue
        split = str(record.get("split", "train"))
        for key in ("loss", "error"):
            value = record.get(key)
            if value is not None and np.isfinite(value):
                series.setdefault(split, {"loss": [], "error": []})[key].append(
                    (float(record["step"]), float(value)))
    if not any(points for by_key in series.values() for points in by_key.values()):
        return _note_figure("no loss or error records yet", path, title)

    # Train first so eval lines are drawn on top of it.
    splits = sorted(series, key=lambda s: (s != "train", s))
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    all_losses = []
    for index, split in enumerate(splits):
        colour = _split_colour(split, index)
        is_train = split == "train"
        style = (dict(linewidth=1.0, alpha=0.8) if is_train
                 else dict(linewidth=2.2, marker="o", markersize=4))
        for key, ax, scale in (("loss", loss_ax, 1.0), ("error", error_ax, 100.0)):
            points = sorted(series[split][key])
            if not points:
                continue
            steps, values = np.array(points).T
            ax.plot(steps, values * scale, color=colour, label=split, **style)
            if key == "loss":
                all_losses.extend(values.tolist())

    positive = np.array([v for v in all_losses if v > 0])
    if len(positive):
        # Percentiles, not min/max: one near-zero noisy train window must neither switch the
        # axis to log nor stretch it over decades of empty space.
        low, high = np.percentile(positive, [1, 99])
    if log_loss is None:
        log_loss = bool(len(positive)) and high / low > 10.0
    if log_loss and len(positive):
        loss_ax.set_yscale("log")
        loss_ax.set_ylim(0.8 * low, 1.25 * positive.max())
    loss_ax.set_ylabel("cross-entropy loss" + (" (log scale)" if log_loss else ""))
    error_ax.set_ylabel("top-1 error (%)")
    error_ax.set_ylim(bottom=0)
    for ax, name in ((loss_ax, "loss"), (error_ax, "top-1 error")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(title="split", fontsize=9)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)
