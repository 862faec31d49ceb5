"""What the analyses (landscape, lesion, sanity) share: a trained workdir loaded for analysis,
an exact jitted evaluation, and the command-line plumbing.

`load_run` is resnet_jax.restore's trained run with what the analyses add: the evaluation
model, the run's data in memory, and its normalisation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import cli as cli_lib
from resnet_jax import config as config_lib
from resnet_jax import restore, rundir
from resnet_jax.data import device as device_data
from resnet_jax.data import sources
from resnet_jax.errors import UserError
from resnet_jax.steps import build_model, cross_entropy

CHECK_FAILED_EXIT = 1  # sanity: a check failed (distinct from a user error, exit 2)


# ---------------------------------------------------------------------------------------
# A trained run.


@dataclasses.dataclass
class Run:
    """A trained workdir, ready to analyse.

    Attributes:
      workdir: the run's directory.
      config: the ConfigDict it was trained with.
      model: the evaluation model (no BN axis); `model.clone(drop_blocks=...)` lesions it.
      variables: {"params", "batch_stats"} of the restored checkpoint (host numpy arrays).
      step: the checkpoint's step.
      mean, std: the normalisation statistics of its training split, as the trainer uses.
      load: split spec ("train", "test[:100]") -> (uint8 images [N, H, W, C], int32 labels [N]).
    """

    workdir: str
    config: ml_collections.ConfigDict
    model: Any
    variables: dict
    step: int
    mean: np.ndarray
    std: np.ndarray
    load: Callable[[str], tuple[np.ndarray, np.ndarray]]

    @property
    def name(self) -> str:
        """A label for plots: the model name and the workdir's base name."""
        return f"{self.config.model.name} ({os.path.basename(os.path.normpath(self.workdir))})"

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> the float32 inputs the model was trained on (no augmentation)."""
        return ((images.astype(np.float32) - self.mean) / self.std).astype(np.float32)

    def eval_splits(self) -> dict[str, str]:
        """The run's evaluation splits, name -> spec, in config order."""
        return config_lib.parse_splits(self.config.data.eval_splits)


def load_run(workdir: str, checkpoint: str | int = "latest") -> Run:
    """Restores a trained workdir for analysis on whatever devices are visible now.

    Args:
      workdir: a directory written by `python -m resnet_jax.main`.
      checkpoint: "latest", "best" (the step recorded as best; the latest if none) or a step.

    Raises:
      UserError: no such run, no checkpoint, an unreadable one, or a streamed dataset (the
        analyses hold their examples in memory).
    """
    workdir = os.path.expanduser(workdir)
    config = rundir.load_config(workdir)  # UserError for a missing workdir or config.json
    if config.data.pipeline != "device":
        raise UserError(f"{workdir}: the analyses read in-memory datasets (data.pipeline=device); this run "
                        f"streams {config.data.name}")
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)),
                                          jax.sharding.PartitionSpec())
    trained = restore.load(workdir, checkpoint, sharding=sharding)
    mean, std = trained.normalization()
    variables = jax.device_get(trained.variables)
    train_arrays = sources.load_split(config.data, config.data.train_split)

    def load(spec: str) -> tuple[np.ndarray, np.ndarray]:
        if spec == config.data.train_split:
            return train_arrays.images, train_arrays.labels
        arrays = sources.load_split(config.data, spec)
        return arrays.images, arrays.labels

    return Run(workdir, config, build_model(config), variables, trained.step, mean, std, load)


def training_examples(data: ml_collections.ConfigDict, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` training examples, normalised as the trainer normalises them
    (statistics of the whole training split): for probes outside training.

    Returns:
      (float32 images [count, H, W, C], int32 labels [count]).

    Raises:
      UserError: a bad split, or fewer than `count` training examples.
    """
    arrays = sources.load_split(data, data.train_split, role="training")
    if len(arrays.labels) < count:
        raise UserError(f"{count} examples asked for, but {data.train_split!r} has {len(arrays.labels)}")
    mean, std = device_data.normalization_stats(data, arrays)
    return (arrays.images[:count].astype(np.float32) - mean) / std, arrays.labels[:count].astype(np.int32)


def subset(images: np.ndarray, labels: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` examples drawn without replacement by `seed` (all of them when count <= 0 or
    count >= N), kept in dataset order."""
    if count <= 0 or count >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(labels), count, replace=False))
    return images[keep], labels[keep]


# ---------------------------------------------------------------------------------------
# Exact evaluation.


def batched(inputs: np.ndarray, labels: np.ndarray, batch: int,
            multiple_of: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads to whole batches: inputs [B, b, ...], labels [B, b], mask [B, b] (0 = padding).

    b is `batch` (at most N), rounded up to a multiple of `multiple_of` (the device count,
    when the batches are split over devices)."""
    n = len(labels)
    batch = -(-max(1, min(batch, n)) // multiple_of) * multiple_of
    padded = -(-n // batch) * batch
    pad = lambda x: np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(padded - n, np.float32)])
    shape = lambda x: x.reshape(padded // batch, batch, *x.shape[1:])
    return shape(pad(inputs)), shape(pad(labels)), shape(mask)


def loss_and_error(model: Any, variables: dict, inputs: jax.Array, labels: jax.Array, mask: jax.Array):
    """Mean cross-entropy and top-1 error over batched examples (see `batched`), evaluated
    with BN's running statistics; a traceable function (the callers jit or vmap it).

    The batches run one after another (`lax.map`) so memory is one batch's activations.
    """

    def one_batch(batch):
        x, y, m = batch
        logits = model.apply(variables, x, train=False)
        loss = cross_entropy(logits, y)
        wrong = (jnp.argmax(logits, -1) != y).astype(jnp.float32)
        return jnp.sum(loss * m), jnp.sum(wrong * m)

    losses, wrongs = jax.lax.map(one_batch, (inputs, labels, mask))
    n = jnp.sum(mask)
    return jnp.sum(losses) / n, jnp.sum(wrongs) / n


# ---------------------------------------------------------------------------------------
# Command line.


def parse_flags(flag_values, argv: list[str], doc: str) -> list[str]:
    """resnet_jax.cli's parsing: `-h`/`--help` prints `doc` and the flags (exit 0), config
    names resolve from anywhere, bad flags are one UserError line."""
    return cli_lib.parse_flags(flag_values, argv, doc)


def cli(run: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Runs a command's `run(argv) -> exit code`; user errors are one line and exit 2."""
    argv = list(sys.argv if argv is None else argv)
    with cli_lib.errors_exit():
        code = run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
