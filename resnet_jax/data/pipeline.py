"""The one data interface the trainer sees, for data on the device and data streamed by grain.

    data = pipeline.create(config, parallel)     # loads and validates every split, or raises
    data.bind(train_step, eval_step)             # per-device steps (see resnet_jax.steps)
    state, acc = data.train(state, acc, n)       # the next n steps, in one dispatch
    sums = data.evaluate(state)                  # {split name: exact sums over the split}
    data.get_state() / data.set_state(saved)     # where the input stands (for checkpoints)
    data.start_notes() / data.log_notes()        # log lines: input delivered vs consumed (stream)

`train_step(state, batch, acc) -> (state, acc)` takes this device's part of a batch
{"image", "label", "mask"} and `eval_step(state, batch) -> sums` returns this device's sums;
the pipeline adds them over batches, then over devices. The trainer never asks which pipeline it has.
"""

import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import config as config_lib
from resnet_jax.data import augment, device, sources
from resnet_jax.errors import UserError
from resnet_jax.parallel import AXIS, Parallel


def step_keys(seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, dropout key) of `step`: fold_in(seed, step), nothing else, so a
    resumed run draws exactly what an uninterrupted one would."""
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), step))
    return augment_key, dropout_key


def create(config: ml_collections.ConfigDict, parallel: Parallel) -> "DevicePipeline | StreamPipeline":
    """The pipeline `config.data.pipeline` names, its data loaded and validated.

    Raises:
      UserError: a bad split, file or array (before anything is compiled or written).
    """
    cls = DevicePipeline if config.data.pipeline == "device" else StreamPipeline
    return cls(config, parallel)


def eval_splits(data: ml_collections.ConfigDict) -> dict[str, str]:
    """data.eval_splits as name -> split, less the optional ones ("name=split?") that the data
    does not hold (only an .npz is looked into; other sources keep every split)."""
    splits = config_lib.parse_splits(data.eval_splits)
    optional = config_lib.optional_splits(data.eval_splits)
    present = sources.split_names(data) if optional else None
    if present is None:
        return splits
    return {name: split for name, split in splits.items() if name not in optional or sources.base_split(split) in present}


class _Pipeline:
    """What both pipelines share: sizes, and the training length in steps."""

    num_train: int
    image_shape: tuple[int, ...]
    normalization: tuple[np.ndarray, np.ndarray]  # (mean, std) of the normalised input

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel):
        self.config, self.parallel = config, parallel
        self.eval_splits = eval_splits(config.data)
        watched = config.train.early_stopping_split
        if watched and watched not in self.eval_splits:
            raise UserError(f"train.early_stopping_split={watched!r} names an optional eval split that "
                            f"{config.data.path or 'the data'} does not have; evaluated: {', '.join(self.eval_splits)}")
        self.per_device_batch = config.train.batch_size // parallel.num_devices
        self.per_device_eval_batch = config.train.eval_batch_size // parallel.num_devices

    def _set_sizes(self) -> None:
        batch = self.config.train.batch_size
        self.steps_per_epoch = self.num_train // batch
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={batch} is larger than the {self.num_train} training examples "
                            f"of {self.config.data.train_split!r}")

    def get_state(self) -> Any:
        return None

    def start_notes(self) -> list[str]:
        """Lines for the start of the run's log (the stream: what its workers deliver)."""
        return []

    def log_notes(self) -> list[str]:
        """Lines after a training log (the stream, once: what the model consumes)."""
        return []

    def set_state(self, saved: Any) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def _result(sums: dict) -> dict:
        n = sums["examples"]
        return {"loss": float(sums["loss"] / n), "error": float(1 - sums["top1"] / n),
                "top5_error": float(1 - sums["top5"] / n), "examples": int(n)}


class DevicePipeline(_Pipeline):
    """Every split held on the devices as uint8; each step gathers its batch through the
    epoch's permutation and augments it inside the jitted step (no host work per step)."""

    def __init__(self, config, parallel):
        super().__init__(config, parallel)
        data = config.data
        if data.source == "tfds":  # a download that fails is about the dataset, not a split
            sources.prepare_tfds(data.name, data.data_dir)
        train = sources.load_split(data, data.train_split, role="training")
        evals = {name: sources.load_split(data, split, role=f"eval split {name!r}")
                 for name, split in self.eval_splits.items()}
        sources.check_consistent(data, train, evals)
        self.num_train = len(train.labels)
        self.image_shape = tuple(train.images.shape[1:])
        self.normalization = device.normalization_stats(data, train)
        self._set_sizes()
        self._host_train = device.host_data(train, self.normalization)
        self._host_eval = {name: device.host_data(arrays, self.normalization, config.train.eval_batch_size)
                           for name, arrays in evals.items()}
        self._chunks, self._permutations = {}, {}

    def bind(self, train_step: Callable, eval_step: Callable) -> None:
        self._train_step, self._eval_step = train_step, eval_step
        self._train_data = self.parallel.replicate(self._host_train)
        self._eval_data = {name: self.parallel.replicate(d) for name, d in self._host_eval.items()}

    def _chunk(self, num_steps: int) -> Callable:
        """`num_steps` steps in one dispatch. It takes the permutations of two epochs, [2, N],
        starting at `first_epoch`, so a chunk (at most an epoch long) may cross one boundary."""
        if num_steps not in self._chunks:
            config, steps_per_epoch = self.config, self.steps_per_epoch

            def one_step(carry, permutations, first_epoch, train_data):
                state, acc = carry
                augment_key, _ = step_keys(config.train.seed, state.step)
                batch = device.train_batch(
                    train_data, permutations[state.step // steps_per_epoch - first_epoch], state.step, steps_per_epoch,
                    self.per_device_batch, jax.lax.axis_index(AXIS), augment_key, config.data.crop_padding,
                    config.data.flip)
                return self._train_step(state, batch, acc)

            def chunk(state, acc, train_data, permutations, first_epoch):
                step = functools.partial(one_step, permutations=permutations, first_epoch=first_epoch,
                                         train_data=train_data)
                if num_steps == 1:
                    # Not a scan of length 1: XLA:CPU runs the kernel-gradient convolutions many
                    # times slower inside a loop body (measured in the README's speed section).
                    return step((state, acc))
                (state, acc), _ = jax.lax.scan(lambda carry, _: (step(carry), None), (state, acc), None,
                                               length=num_steps)
                return state, acc

            self._chunks[num_steps] = self.parallel.wrap(chunk, (None,) * 5, (None, None), donate_argnums=(0, 1))
        return self._chunks[num_steps]

    def _epoch_orders(self, epoch: int):
        """The data orders of `epoch` and the next, replicated (computed once an epoch)."""
        if epoch not in self._permutations:
            order = jax.jit(device.epoch_permutation, static_argnums=(2,))
            two = [np.asarray(order(self.config.train.seed, e, self.num_train)) for e in (epoch, epoch + 1)]
            self._permutations = {epoch: self.parallel.replicate((np.stack(two), np.int32(epoch)))}
        return self._permutations[epoch]

    def train(self, state, acc, num_steps: int, step: int):
        """Runs steps `step` ... `step + num_steps - 1` (`step` is state.step, known on the host)."""
        permutations, first_epoch = self._epoch_orders(step // self.steps_per_epoch)
        return self._chunk(num_steps)(state, acc, self._train_data, permutations, first_epoch)

    @functools.cached_property
    def _evaluate(self) -> Callable:
        eval_batch = self.config.train.eval_batch_size

        def evaluate(state, eval_data):
            device_index = jax.lax.axis_index(AXIS)

            def body(i, sums):
                batch = device.eval_batch(eval_data, i, self.per_device_eval_batch, device_index)
                return jax.tree.map(jnp.add, sums, self._eval_step(state, batch))

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                self._eval_step, state, device.eval_batch(eval_data, 0, self.per_device_eval_batch, device_index)))
            local = jax.lax.fori_loop(0, eval_data.labels.shape[0] // eval_batch, body, zeros)
            return jax.lax.psum(local, AXIS)  # once, outside the loop

        return self.parallel.wrap(evaluate, (None, None), None)

    def evaluate(self, state) -> dict[str, dict]:
        """Exact evaluation of every split: each example counted once (padding masked)."""
        return {name: self._result(self.parallel.unreplicate(self._evaluate(state, data)))
                for name, data in self._eval_data.items()}


class StreamPipeline(_Pipeline):
    """TFDS splits streamed by grain workers (JPEG decode and crops on the host); the
    iterator's position is checkpointed, so resume is exact here too."""

    def __init__(self, config, parallel):
        super().__init__(config, parallel)
        from resnet_jax.data import stream  # grain: only streamed data needs it

        data = config.data
        sources.prepare_tfds(data.name, data.data_dir)
        self.num_train = stream.num_examples(data.name, data.train_split, data.data_dir)
        for split in self.eval_splits.values():  # a bad eval split fails now, not at the first evaluation
            stream.num_examples(data.name, split, data.data_dir)
        self.image_shape = (data.image_size, data.image_size, 3)
        self.normalization = stream.normalization(data.normalization)
        self._set_sizes()
        self._iterator = None

    def _make(self, split: str, train: bool, batch: int):
        return _host_stream(self.config, split, train, batch)

    def bind(self, train_step: Callable, eval_step: Callable) -> None:
        # The workers ship uint8; normalising (and the compute-dtype cast) is the first thing
        # the step does on the device, fused by XLA into the stem's input.
        mean, std = (np.asarray(x, np.float32) for x in self.normalization)
        dtype = jnp.dtype(self.config.model.dtype)
        to_input = lambda batch: normalize_on_device(batch, mean, std, dtype)
        self._step = self.parallel.wrap(lambda state, batch, acc: train_step(state, to_input(batch), acc),
                                        (None, 0, None), (None, None), donate_argnums=(0, 2))
        self._eval = self.parallel.wrap(lambda state, batch: jax.lax.psum(eval_step(state, to_input(batch)), AXIS),
                                        (None, 0), None)
        self._iterator = self._make(self.config.data.train_split, True, self.config.train.batch_size)
        self._rate = _InputRate(self.config)

    def train(self, state, acc, num_steps: int, step: int):
        for _ in range(num_steps):  # host batches: one dispatch a step
            start = time.perf_counter()
            batch = next(self._iterator)
            waited = time.perf_counter() - start
            state, acc = self._step(state, self.parallel.shard(batch), acc)
            self._rate.stepped(waited, len(batch["label"]))
        return state, acc

    def start_notes(self) -> list[str]:
        return self._rate.start_notes(self._iterator)

    def log_notes(self) -> list[str]:
        return self._rate.log_notes()

    def evaluate(self, state) -> dict[str, dict]:
        results = {}
        for name, split in self.eval_splits.items():
            sums = None
            for batch in self._make(split, False, self.config.train.eval_batch_size):
                out = self.parallel.unreplicate(self._eval(state, self.parallel.shard(batch)))
                sums = out if sums is None else jax.tree.map(np.add, sums, out)
            results[name] = self._result(sums)
        return results

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, saved: Any) -> None:
        if saved:
            self._iterator.set_state(saved)

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()


def _host_stream(config: ml_collections.ConfigDict, split: str, train: bool, global_batch: int):
    """This host's share of a streamed split (grain over TFDS)."""
    from resnet_jax.data import stream  # grain: only streamed data needs it

    return stream.make_stream(config, split, train=train, global_batch_size=global_batch, seed=config.train.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())


def eval_batches(config: ml_collections.ConfigDict, split: str, global_batch: int,
                 normalization: tuple[np.ndarray, np.ndarray]):
    """Host batches of `split` in order, for evaluation with per-example outputs (reports).

    Yields:
      {"image": float32 normalised [B, H, W, C], "label": int32 [B], "mask": float32 [B]
      (0 on the padding that fills the last batch), "pixels": uint8 [B, H, W, C] to draw}.

    Raises:
      UserError: an unknown split or bad arrays (at the first `next`).
    """
    mean, std = (np.asarray(x, np.float32) for x in normalization)
    if config.data.pipeline == "device":
        arrays = sources.load_split(config.data, split)
        padded = device.host_data(arrays, (mean, std), global_batch)
        for start in range(0, len(padded.labels), global_batch):
            pixels = padded.images[start:start + global_batch]
            yield {"image": (pixels.astype(np.float32) - mean) / std, "label": padded.labels[start:start + global_batch],
                   "mask": padded.mask[start:start + global_batch], "pixels": pixels}
        return
    from resnet_jax.data import stream

    iterator = _host_stream(config, split, False, global_batch)
    try:
        for batch in iterator:  # uint8 from the workers: the pixels as they are
            image = stream.host_normalize(batch["image"], batch["mask"], config.data.normalization)
            yield {**batch, "image": image, "pixels": batch["image"]}
    finally:
        iterator.close()


def normalize_on_device(batch: dict, mean: np.ndarray, std: np.ndarray, dtype) -> dict:
    """A streamed batch as the step takes it: uint8 images -> (x - mean) / std in float32,
    padding rows (mask 0) zero as the host used to make them, then cast to the compute
    dtype (the model's first op would cast them anyway)."""
    images = augment.normalize(batch["image"], mean, std)
    images = jnp.where(batch["mask"][:, None, None, None] > 0, images, 0.0)
    return {**batch, "image": images.astype(dtype)}


class _InputRate:
    """What the stream's workers deliver (measured at the start) against what the model
    consumes (measured over the first log period after the first, compiling, step), and
    whether the step waited for its batches."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config, self.workers = config, config.data.workers
        self.delivered = self.per_worker = None  # images/s the configured workers deliver, and one
        self._steps, self._images, self._waited, self._since, self._reported = -1, 0, 0.0, None, False
        self.clock = time.perf_counter

    def start_notes(self, iterator) -> list[str]:
        self.per_worker = per_worker = iterator.measure_rate()
        cores = os.cpu_count() or 1
        self.delivered = per_worker * max(min(self.workers, cores), 1)
        who = (f"{self.workers} grain worker{'s' * (self.workers != 1)} deliver" if self.workers
               else "the main process (data.workers=0) delivers")
        line = f"input: {who} about {self.delivered:,.0f} images/s ({per_worker:,.0f}/s a worker, {cores} cores)"
        if self.workers > cores:
            line += f"; warning: more workers than cores ({cores}), they share them"
        return [line]

    def stepped(self, waited: float, images: int) -> None:
        self._steps += 1
        if self._steps == 0:  # the first step compiles: measure from its end
            self._since = self.clock()
            return
        self._images += images
        self._waited += waited

    def log_notes(self) -> list[str]:
        if self._reported or self._steps < 1:
            return []
        self._reported = True
        elapsed = self.clock() - self._since
        waited = min(self._waited / elapsed, 1.0)
        trained = self._images / elapsed  # images/s this host trained on
        model = self._images / max(elapsed - self._waited, 1e-9)  # without the waits
        lines = [f"input: the model consumes about {model:,.0f} images/s on this host (trained {trained:,.0f}/s "
                 f"over {self._steps} steps; {100 * waited:.0f}% of the time waiting for batches)"]
        if waited > 0.1 or (self.delivered and self.delivered < model):
            need = math.ceil(model / self.per_worker) if self.per_worker else None
            lines.append("warning: input is the bottleneck: the workers deliver "
                         + (f"about {self.delivered:,.0f} images/s" if self.delivered else "too few images")
                         + (f"; about {need} workers would keep up (data.workers)" if need else ""))
        return lines

