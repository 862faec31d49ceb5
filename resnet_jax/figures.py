"""The library's own figures (training curves, confusion matrix, mistakes, activations); every
function writes one PNG. The experiments' figures (Fig. 6, ablation studies, gradient flow,
landscapes, lesions) live with the experiments, in experiments/plots.py, and reuse `save_png`.

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

_DPI = 120
# Eval splits get fixed colours so "test" is the same colour in every curves figure.
_SPLIT_COLOURS = {"train": "tab:blue", "test": "tab:red", "val": "tab:green",
                  "validation": "tab:green"}


def save_png(fig: plt.Figure, path: str | os.PathLike) -> str:
    """Writes `fig` to `path` as PNG (making the folder) and frees it."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def note_png(message: str, path: str | os.PathLike, title: str) -> str:
    """A small PNG that says why there is nothing to plot (so reports never have holes)."""
    fig, ax = plt.subplots(figsize=(5, 2), layout="constrained")
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, transform=ax.transAxes)
    return save_png(fig, path)


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
    return save_png(fig, path)


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
        return note_png("no misclassified examples", path, title)

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
    return save_png(fig, path)


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
    return save_png(fig, path)


# --------------------------------------------------------------------------- curves


def _split_colour(split: str, fallback_index: int) -> str:
    return _SPLIT_COLOURS.get(split, f"C{(fallback_index + 3) % 10}")


EMA_SUFFIX = "EMA"  # a split's weight-EMA line in the legend: "test EMA"


def curves_png(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike,
    *, log_loss: bool | None = None, title: str = "training curves",
) -> str:
    """Loss and top-1 error (%) against step, one line per split, from metrics.jsonl records.

    Train records are drawn thin (they are per-log-window and noisy), eval records bold
    with markers (fewer points, the numbers that matter); a weight EMA's ("ema_loss",
    "ema_error") dashed in its split's colour. Records lacking a key are skipped for that
    panel only, so partial records (e.g. lr-only) do no harm.

    Args:
      records: dicts with "step", "split" and some of "loss", "error" (fraction), "ema_loss", "ema_error".
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
        for prefix, name in (("", split), ("ema_", f"{split} {EMA_SUFFIX}")):
            for key in ("loss", "error"):
                value = record.get(prefix + key)
                if value is not None and np.isfinite(value):
                    series.setdefault(name, {"loss": [], "error": []})[key].append(
                        (float(record["step"]), float(value)))
    if not any(points for by_key in series.values() for points in by_key.values()):
        return note_png("no loss or error records yet", path, title)

    # Train first so eval lines are drawn on top of it.
    splits = sorted(series, key=lambda s: (s != "train", s))
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    all_losses = []
    for index, split in enumerate(splits):
        is_ema = split.endswith(f" {EMA_SUFFIX}")
        base = split.removesuffix(f" {EMA_SUFFIX}")
        colour = _split_colour(base, splits.index(base) if base in splits else index)
        is_train = split == "train"
        style = (dict(linewidth=1.0, alpha=0.8) if is_train
                 else dict(linewidth=2.2, marker="o", markersize=4, linestyle="--" if is_ema else "-"))
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
    return save_png(fig, path)
