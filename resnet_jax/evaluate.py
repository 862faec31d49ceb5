"""A trained workdir -> a report: metrics, confusion matrix, mistakes, feature maps, curves.

    python -m resnet_jax.evaluate --workdir=DIR [--split=test] [--checkpoint=best|latest|STEP] [--weights=raw|ema]

writes `DIR/report/` (`metrics.json`, `confusion_matrix.png`, `mistakes.png`,
`activations.png`, `curves.png` and `report.md`, which ties them together). The run is
rebuilt from `DIR/config.json` and its checkpoint alone: the model from the config; params,
BN statistics and the training split's normalisation statistics from the checkpoint (no
optimiser, no training data), onto however many devices are visible now. Every example of
the split gets its logits exactly once (the last batch is padded and the padding masked
out), and all metrics are computed on the host from them. `--weights=ema` evaluates the
run's weight EMA (train.ema_decay) instead of its raw weights.

`report(workdir, ...)` is the same as a function, for experiments.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jax
import ml_collections
from absl import flags
import numpy as np

from resnet_jax import cli, restore, rundir
from resnet_jax import config as config_lib
from resnet_jax import metrics as metrics_lib
from resnet_jax import reporting
from resnet_jax.data import pipeline, sources
from resnet_jax.errors import UserError
from resnet_jax.parallel import Parallel
from resnet_jax.steps import build_model

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
MAX_MISTAKES = 32  # images in mistakes.png (4 rows of 8)
ACTIVATION_IMAGES = 4  # rows in activations.png


# ---------------------------------------------------------------------------------------
# The run's labels and split.


def class_names(data: ml_collections.ConfigDict) -> list[str]:
    """Label names: CIFAR-10's, the digits, TFDS's label names, or else class indices."""
    count = data.num_classes
    if data.name == "cifar10" and count == len(CIFAR10_NAMES):
        return list(CIFAR10_NAMES)
    if data.source == "digits":
        return [str(i) for i in range(count)]
    if data.source == "tfds":
        try:  # dataset_info.json of the prepared dataset; anything wrong -> indices
            import tensorflow_datasets as tfds  # heavy: only TFDS runs have its label names

            names = tfds.builder(data.name, data_dir=data.data_dir or None).info.features["label"].names
            if len(names) == count:
                return [str(name) for name in names]
        except Exception:  # noqa: BLE001 -- names are a nicety, never a reason to fail
            pass
    return [str(i) for i in range(count)]


def resolve_split(config: ml_collections.ConfigDict, split: str) -> tuple[str, str]:
    """(name, spec): a name from data.eval_splits, or any split spec used as its own name."""
    named = config_lib.parse_splits(config.data.eval_splits)
    if split in named:
        return split, named[split]
    return split, split


# ---------------------------------------------------------------------------------------
# Predictions.


def _predictor(parallel: Parallel, model, variables):
    """predict(normalised images [B, ...]) -> logits on device (see `_to_host`), mapped over
    every device. B must be a multiple of the device count."""
    mapped = parallel.wrap(lambda v, images: model.apply(v, images, train=False), (None, 0), 0)
    return lambda images: mapped(variables, parallel.shard(images))


def _to_host(logits: jax.Array) -> np.ndarray:
    """Device logits -> numpy [B, C] (pmap's come as [devices, per_device, C])."""
    logits = np.asarray(jax.device_get(logits), np.float32)
    return logits.reshape(-1, logits.shape[-1])


def _global_batch(eval_batch_size: int, num_devices: int) -> int:
    per_device = -(-eval_batch_size // num_devices)
    return per_device * num_devices


class _MistakeImages:
    """Keeps the images of the surest mistakes seen so far, so a streamed split never has
    to be held in memory to draw mistakes.png."""

    def __init__(self, limit: int):
        self.limit, self.kept = limit, {}  # global index -> (confidence, image)

    def add(self, offset: int, labels, logits, images) -> None:
        index, _, confidence = metrics_lib.most_confident_mistakes(labels, logits, self.limit, from_logits=True)
        for i, c in zip(index, confidence):
            self.kept[offset + int(i)] = (float(c), images[i])
        if len(self.kept) > self.limit:
            order = sorted(self.kept, key=lambda k: (-self.kept[k][0], k))[: self.limit]
            self.kept = {k: self.kept[k] for k in order}

    def images(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.kept[int(i)][1] for i in index]) if len(index) else np.zeros((0, 1, 1, 3), np.uint8)


def _predictions(config, parallel: Parallel, model, variables, spec: str, normalization):
    """Logits of every example of split `spec`, each exactly once (padding dropped), plus
    what the pictures need: the surest mistakes' images and a few inputs of varied classes."""
    batch = _global_batch(config.train.eval_batch_size, parallel.num_devices)
    predict = _predictor(parallel, model, variables)
    all_logits, all_labels, mistakes, firsts = [], [], _MistakeImages(MAX_MISTAKES), []
    for host_batch in pipeline.eval_batches(config, spec, batch, normalization):
        keep = host_batch["mask"] > 0
        logits = _to_host(predict(host_batch["image"]))[keep]
        labels = host_batch["label"][keep]
        mistakes.add(sum(map(len, all_labels)), labels, logits, host_batch["pixels"][keep])
        if sum(map(len, firsts)) < 10 * ACTIVATION_IMAGES:
            firsts.append((host_batch["image"][keep], host_batch["pixels"][keep], labels))
        all_logits.append(logits)
        all_labels.append(labels)
    inputs, pixels, labels = (np.concatenate(parts) for parts in zip(*firsts))
    rows = _first_of_each_class(labels, ACTIVATION_IMAGES)
    return np.concatenate(all_logits), np.concatenate(all_labels), mistakes, inputs[rows], pixels[rows]


def _activations(model, variables, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Feature maps the model sows ("stem", "stage1", ...) for a few normalised inputs."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    _, sown = apply(variables, np.asarray(inputs, np.float32))
    layers = {name: np.asarray(value[0], np.float32) for name, value in sown["intermediates"].items()}
    stage_number = lambda name: int(name[len("stage"):]) if name[len("stage"):].isdigit() else 10**6
    order = sorted(layers, key=lambda name: (name != "stem", stage_number(name), name))
    return {name: layers[name] for name in order}


def _first_of_each_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first example of the first `count` classes present (varied rows)."""
    _, first = np.unique(labels, return_index=True)
    chosen = np.sort(first)[:count]
    if len(chosen) < count:  # fewer classes than rows: top up in dataset order
        rest = np.setdiff1d(np.arange(len(labels)), chosen)[: count - len(chosen)]
        chosen = np.concatenate([chosen, rest])
    return chosen


# ---------------------------------------------------------------------------------------
# The report.


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _markdown(metrics: dict, flat_config: dict, files: dict[str, str]) -> str:
    ck, split = metrics["checkpoint"], metrics["split"]
    lines = [
        f"# {metrics['model']} on {metrics['dataset']}: {split['name']} split",
        "",
        f"Run `{metrics['workdir']}`, checkpoint at step {ck['step']} ({ck['requested']}"
        + (", its weight EMA" if metrics.get("weights") == "ema" else "")
        + (f"; {ck['note']}" if ck.get("note") else "") + f"), split `{split['spec']}` "
        f"({metrics['num_examples']:,} images), evaluated {metrics['evaluated_at']} on {metrics['devices']}.",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        f"| top-1 error | {_percent(metrics['error'])} |",
        f"| top-{metrics['top5_k']} error | {_percent(metrics['top5_error'])} |",
        f"| top-1 accuracy | {_percent(metrics['accuracy'])} |",
        f"| loss (cross-entropy) | {metrics['loss']:.4f} |",
        f"| macro F1 | {metrics['macro_avg']['f1']:.4f} |",
        f"| weighted F1 | {metrics['weighted_avg']['f1']:.4f} |",
        f"| examples | {metrics['num_examples']:,} |",
    ]
    if metrics.get("recorded_error") is not None:
        lines.append(f"| top-1 error logged by training at step {ck['step']} "
                     f"| {_percent(metrics['recorded_error'])} |")
    lines += ["", "## Per class", ""]
    per_class = metrics["per_class"]
    if len(per_class) > 30:  # 1000 ImageNet rows would bury the rest; metrics.json has them all
        per_class = sorted(per_class, key=lambda c: (c["f1"], c["index"]))[:20]
        lines += [f"The 20 classes with the lowest F1 of {metrics['num_classes']} (all in `metrics.json`).", ""]
    lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    row = lambda name, c: (f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} "
                           f"| {c['support']:,} |")
    lines += [row(c["class"], c) for c in per_class]
    lines += [row("**macro avg**", metrics["macro_avg"]), row("**weighted avg**", metrics["weighted_avg"])]
    captions = {
        "confusion_matrix": ("Confusion matrix", "Rows are true classes, columns predictions; colour is the "
                             "fraction of each true class, numbers are counts."),
        "mistakes": ("Most confident mistakes", "The misclassified images the model was surest about, "
                     "surest first, with the probability it gave its (wrong) prediction."),
        "activations": ("Feature maps", "Inputs, then for the stem and each stage the channel mean and the "
                        "most active channels."),
        "curves": ("Training curves", "Loss and top-1 error from `metrics.jsonl`."),
    }
    for key, (title, caption) in captions.items():
        lines += ["", f"## {title}", "", caption, "", f"![{title.lower()}]({files[key]})"]
    sections = (("Model", "model."), ("Data", "data."), ("Training", "train."), ("Optimiser", "optim."),
                ("Parallelism", "parallel."))
    lines += ["", "## Run configuration (`config.json`)"]
    for title, prefix in sections:
        items = sorted((k, v) for k, v in flat_config.items() if k.startswith(prefix))
        if items:
            lines += ["", f"**{title}**", "", "| key | value |", "|---|---|"]
            lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in items]
    return "\n".join(lines) + "\n"


def report(workdir: str, split: str = "test", checkpoint: str | int = "best",
           out_dir: str | None = None, weights: str = "raw") -> dict[str, Any]:
    """Restores a run and writes its report (metrics.json, PNGs, report.md).

    Args:
      workdir: the run's directory (config.json, checkpoints/, metrics.jsonl).
      split: a name from the run's data.eval_splits ("test"), or any split spec of its
        dataset ("train[:1000]").
      checkpoint: "best" (the step recorded as best; the latest if none), "latest" (the
        newest readable checkpoint) or a step number.
      out_dir: where to write; default `workdir/report` (refused while a run trains there).
      weights: "raw" (the trained weights) or "ema" (the run's weight EMA, train.ema_decay).

    Returns:
      The contents of metrics.json: `metrics.classification_report` (loss, accuracy, error,
      top5_error, per_class, macro_avg, weighted_avg, confusion_matrix, ...) plus
      "checkpoint" ({"requested", "step", "note"}), "split" ({"name", "spec"}), "weights",
      "recorded_error" (the error training logged for this split, step and weights, if any),
      "model", "dataset", "workdir", "devices", "evaluated_at" and "files".

    Raises:
      UserError: no run, no checkpoint, an unknown split or step, ema weights of a run
        without them; no `out_dir` while a run is training in `workdir`.
    """
    workdir = os.path.expanduser(workdir)
    holder = None if out_dir else rundir.live_holder(workdir)
    if holder:  # a reader never writes into a workdir that a run is training in
        raise UserError(f"{workdir} is in use by {holder} (a run is training there): evaluate writes nothing "
                        "into it; pass --out_dir=DIR for the report, or evaluate once the run has ended")
    config = rundir.load_config(workdir)
    restore.check_weights(config, workdir, weights)
    which = rundir.parse_checkpoint(checkpoint)
    rundir.check_checkpoint(workdir, which)  # before the split, which is slower to check
    split_name, spec = resolve_split(config, split)
    data = config.data

    try:  # a bad split fails here, before anything is compiled
        if data.pipeline == "device":
            sources.load_split(data, spec)
        else:
            from resnet_jax.data import stream  # grain: only streamed runs need it

            stream.num_examples(data.name, spec, data.data_dir)
    except UserError as error:
        eval_names = ", ".join(config_lib.parse_splits(data.eval_splits)) or "none"
        reason, prefix = str(error), f"unknown split {spec!r}; "
        if reason.startswith(prefix):
            raise UserError(f"unknown split {spec!r}: not one of this run's eval splits ({eval_names}) nor a "
                            f"split of {data.name} ({reason[len(prefix):]})") from None
        raise UserError(f"{reason} (this run's eval splits: {eval_names})") from None

    from resnet_jax import figures  # matplotlib: imported once the input has been checked

    parallel = Parallel(config.parallel.backend)
    run = restore.load(workdir, which, sharding=parallel.replicated, weights=weights)  # says when "best" falls back
    normalization = run.normalization()
    variables, step, note = parallel.from_global(run.variables), run.step, run.note
    model = build_model(config)
    names = class_names(data)
    logits, labels, mistakes, inputs, display = _predictions(config, parallel, model, variables, spec, normalization)

    metrics = metrics_lib.classification_report(labels, logits, names, from_logits=True)
    records = reporting.read_metrics(workdir)
    error_key = "ema_error" if weights == "ema" else "error"  # metrics.jsonl's key for these weights
    recorded = [r.get(error_key) for r in records if r.get("split") == split_name and r.get("step") == step]
    metrics.update(
        checkpoint={"requested": str(which), "step": int(step), "note": note},
        split={"name": split_name, "spec": spec}, weights=weights,
        recorded_error=recorded[-1] if recorded else None,
        model=config.model.name, dataset=data.name, workdir=os.path.abspath(workdir),
        devices=parallel.describe(),
        evaluated_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )

    out_dir = os.path.expanduser(out_dir) if out_dir else os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    files = {key: f"{key}.png" for key in ("confusion_matrix", "mistakes", "activations", "curves")}
    where = f"{config.model.name} on {data.name} {split_name}, step {step}" + (", EMA weights" if weights == "ema" else "")
    figures.confusion_matrix_png(np.asarray(metrics["confusion_matrix"]), names,
                                 os.path.join(out_dir, files["confusion_matrix"]), title=where)

    index, predicted, confidence = metrics_lib.most_confident_mistakes(labels, logits, MAX_MISTAKES,
                                                                       from_logits=True)
    images = mistakes.images(index)
    cm = np.asarray(metrics["confusion_matrix"])
    wrong = int(cm.sum() - np.trace(cm))
    figures.mistakes_png(images, labels[index], predicted, confidence, names,
                         os.path.join(out_dir, files["mistakes"]),
                         title=f"most confident mistakes: {where} ({wrong:,} of {len(labels):,} misclassified)")

    host_variables = parallel.unreplicate(variables)
    figures.activations_png(display, _activations(model, host_variables, inputs),
                            os.path.join(out_dir, files["activations"]),
                            max_images=ACTIVATION_IMAGES, title=f"feature maps: {where}")
    figures.curves_png(records, os.path.join(out_dir, files["curves"]),
                       title=f"training curves: {config.model.name} on {data.name}")

    metrics["files"] = dict(files, metrics="metrics.json", report="report.md")
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(metrics, rundir.read_flat(workdir), files))
    metrics["out_dir"] = os.path.abspath(out_dir)
    if jax.process_index() == 0:
        logged = metrics["recorded_error"]
        print(f"{where} ({metrics['num_examples']:,} images, {parallel.describe()}): "
              f"loss {metrics['loss']:.4f}, top-1 error {_percent(metrics['error'])}, "
              f"top-{metrics['top5_k']} error {_percent(metrics['top5_error'])}"
              + (f" (training logged {_percent(logged)})" if logged is not None else ""), flush=True)
        print(f"report: {os.path.join(out_dir, 'report.md')}", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------
# Command line.


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The run's directory (config.json, checkpoints/, metrics.jsonl).", flag_values=FLAGS)
flags.DEFINE_string("split", "test", "A name from the run's data.eval_splits (test) or a split spec (train[:1000]).",
                    flag_values=FLAGS)
flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.", flag_values=FLAGS)
flags.DEFINE_string("out_dir", None, "Where to write (default WORKDIR/report).", flag_values=FLAGS)
flags.DEFINE_string("weights", "raw", "raw, or ema: the run's weight EMA (train.ema_decay > 0).", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m resnet_jax.evaluate --workdir=DIR [--split=test] [--checkpoint=best] [--weights=raw]`.

    Args:
      argv: [prog, *arguments] (sys.argv by default).
    """
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        if FLAGS.workdir is None:
            raise UserError("--workdir is required, e.g. --workdir=runs/r56")
        report(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint, FLAGS.out_dir, FLAGS.weights)


if __name__ == "__main__":
    main()
