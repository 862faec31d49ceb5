"""Training-step throughput and MFU, and the end-to-end rate with the real input pipeline.

    python -m experiments.benchmark --model=resnet50 --batch=256 --dtype=bfloat16 [--steps=50]
        [--data=synthetic|device|stream] [--json=FILE]

- synthetic: the mapped train step on one fixed batch already on the device (what
  experiments/reference.py measures); ms/step (median of three rounds of --steps/3
  back-to-back steps), img/s, compile time (lowering + XLA compilation), model FLOP/s
  (from XLA's cost analysis of the step as lowered) and MFU against the card's peak.
- device: `train_and_evaluate` end to end on device-resident data (gather, augmentation,
  per-epoch evaluation and checkpoints included), from its logged images/s.
- stream: the grain pipeline's decode + crop rate, in images/s per worker.
Prints one table row per configuration (and appends it to --json as a JSON line).
"""

import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

from resnet_jax import cli, models, train
from resnet_jax.errors import UserError
from resnet_jax.parallel import Parallel
from resnet_jax.reporting import read_metrics

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "resnet20", "Model name, e.g. resnet20, resnet56, resnet50.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 128, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Timed steps (synthetic) or training steps (device).", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.", flag_values=FLAGS)
flags.DEFINE_enum("data", "synthetic", ["synthetic", "device", "stream"], "What to measure.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 0, "0: 32 for CIFAR models, 224 for ImageNet models.", flag_values=FLAGS)
flags.DEFINE_integer("steps_per_dispatch", 1, "device: steps scanned per dispatch.", flag_values=FLAGS)
flags.DEFINE_string("npz", "", "device: train on this .npz (e.g. CIFAR-10) instead of synthetic images.",
                    flag_values=FLAGS)
flags.DEFINE_string("tfds_name", "", "stream: a prepared TFDS dataset to decode.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "stream: TFDS data_dir.", flag_values=FLAGS)
flags.DEFINE_integer("workers", 1, "stream: grain worker processes.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Append the result as one JSON line to this file.", flag_values=FLAGS)

# Dense bf16 / fp32 (TF32 off) peak FLOP/s of the cards we report on.
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
              "A100": {"bfloat16": 312e12, "float32": 19.5e12}}


def _config(model: str, batch: int, dtype: str, image_size: int):
    from resnet_jax.configs import cifar, imagenet

    if models.model_family(model) == "imagenet":
        config = imagenet.get_config(model)
        config.data.pipeline = "device"
    else:
        config = cifar.get_config(model)
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.data.source = "synthetic"
    config.data.image_size = image_size or config.data.image_size
    config.data.normalization = "none"
    config.data.synthetic_examples = 2 * batch
    config.train.eval_batch_size = batch
    config.data.eval_splits = "test=test"
    config.train.progress = False
    return config


def _peak(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for card, peaks in PEAK_FLOPS.items():
        if card in kind:
            return peaks[dtype]
    return None


def _flops(lowered, compiled) -> float:
    """The step's FLOPs from XLA's cost analysis of the program as written (before
    optimisation): XLA:GPU's compiled module runs convolutions as cuDNN calls, which its
    cost analysis does not count (an H100 run reported 6.5 MFLOP per resnet20 image instead
    of 226). The compiled module's count where the lowered one has none."""
    for stage in (lowered, compiled):
        try:
            cost = stage.cost_analysis() if stage is not None else None
        except Exception:  # not every backend or version offers it
            cost = None
        cost = cost[0] if isinstance(cost, list) else cost
        if cost and cost.get("flops"):
            return float(cost["flops"])
    return 0.0


def synthetic_step(config, steps: int, warmup: int) -> dict:
    """Median time of the mapped train step on a fixed on-device batch."""
    parallel = Parallel(config.parallel.backend)
    trainer = train.Trainer(config, parallel)
    state = trainer.init_state()
    acc = trainer.empty_accumulator()
    rng = np.random.default_rng(0)
    size, batch = config.data.image_size, config.train.batch_size
    host_batch = {"image": rng.standard_normal((batch, size, size, 3), np.float32),
                  "label": rng.integers(0, config.data.num_classes, batch).astype(np.int32),
                  "mask": np.ones(batch, np.float32)}
    device_batch = parallel.shard(host_batch)
    step = trainer.train_on_batch
    start = time.perf_counter()
    lowered = step.lower(state, device_batch, acc) if hasattr(step, "lower") else None
    compiled = lowered.compile() if lowered is not None else None
    if compiled is None:  # no AOT lowering: the first call compiles (and runs one step)
        state, acc = step(state, device_batch, acc)
        jax.block_until_ready(acc)
    compile_s = time.perf_counter() - start
    flops = _flops(lowered, compiled)
    step = compiled or step  # the executable just built: calling `step` would compile it again
    for _ in range(warmup):
        state, acc = step(state, device_batch, acc)
    jax.block_until_ready(acc)
    # Like experiments/reference.py: steps are dispatched back to back and waited for once, so host
    # synchronisation is not timed; the median over a few such rounds resists noise.
    times = []
    per_round = max(steps // 3, 1)
    for _ in range(max(steps // per_round, 1)):
        start = time.perf_counter()
        for _ in range(per_round):
            state, acc = step(state, device_batch, acc)
        jax.block_until_ready(acc)
        times.append((time.perf_counter() - start) / per_round)
    median = statistics.median(times)
    # cost_analysis counts one device's program under shard_map: scale by devices.
    total_flops = flops * parallel.num_devices
    peak = _peak(config.model.dtype)
    return {"ms_per_step": 1e3 * median, "images_per_sec": batch / median, "compile_s": compile_s,
            "tflops_per_sec": total_flops / median / 1e12 if flops else None,
            "mfu": total_flops / median / (peak * parallel.num_devices) if flops and peak else None}


def device_end_to_end(config, steps: int, steps_per_dispatch: int, npz: str) -> dict:
    """train_and_evaluate on device-resident data; the median logged rate after the first window."""
    if npz:
        config.data.source, config.data.path = "npz", npz
        config.data.normalization = "per_pixel_mean"
        config.train.eval_batch_size = 1000
    config.train.total_steps = steps
    config.train.log_every = max(steps // 10, 1)
    config.train.checkpoint_every = steps
    config.train.steps_per_dispatch = steps_per_dispatch
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        rates = [r["images_per_sec"] for r in read_metrics(workdir) if r["split"] == "train"][1:]
    rate = statistics.median(rates)
    return {"images_per_sec": rate, "ms_per_step": 1e3 * config.train.batch_size / rate}


def stream_rate(config, tfds_name: str, data_dir: str, workers: int, batches: int) -> dict:
    from resnet_jax.data import stream  # grain: only this measurement needs it

    if not tfds_name:
        raise UserError("--data=stream needs --tfds_name of a prepared TFDS image dataset")
    config.data.source, config.data.name, config.data.data_dir = "tfds", tfds_name, data_dir
    config.data.workers, config.data.normalization = workers, "imagenet"
    out = stream.measure_throughput(config, config.data.train_split, config.train.batch_size, batches)
    return {"images_per_sec": out["images_per_s"], "images_per_sec_per_worker": out["images_per_s_per_worker"]}


def run(argv) -> dict:
    try:
        family = models.model_family(FLAGS.model)
    except ValueError as error:
        raise UserError(str(error)) from None
    image_size = FLAGS.image_size or (224 if family == "imagenet" else 32)
    config = _config(FLAGS.model, FLAGS.batch, FLAGS.dtype, image_size)
    if FLAGS.batch % jax.device_count():
        raise UserError(f"--batch={FLAGS.batch} does not divide over {jax.device_count()} devices")
    if FLAGS.data == "synthetic":
        result = synthetic_step(config, FLAGS.steps, FLAGS.warmup)
    elif FLAGS.data == "device":
        result = device_end_to_end(config, FLAGS.steps, FLAGS.steps_per_dispatch, FLAGS.npz)
    else:
        result = stream_rate(config, FLAGS.tfds_name, FLAGS.data_dir, FLAGS.workers, FLAGS.steps)
    row = {"model": FLAGS.model, "batch": FLAGS.batch, "dtype": FLAGS.dtype, "image_size": image_size,
           "data": FLAGS.data, "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
           "jax": jax.__version__, **result}
    cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None]
    print("RESULT " + " ".join(cells), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        run(cli.parse_flags(FLAGS, argv, __doc__))


if __name__ == "__main__":
    main()
