"""Run as a script in a subprocess with N fake devices: a few train steps of the tiny model on
a fixed batch, through `Trainer.train_on_batch` (the per-device step under shard_map or pmap),
for several configs in one process (one JAX start-up for all of them). Writes each config's
state before and after to one .npz, keys prefixed "NAME/":

    python one_step_probe.py OUT.npz STEPS '{"NAME": {"parallel.backend": "pmap", ...}, ...}'
"""

import json
import sys

import jax
import numpy as np

from helpers import tiny_config
from resnet_jax import train
from resnet_jax.parallel import Parallel


def fixed_batch(batch_size: int = 32, size: int = 8):
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((batch_size, size, size, 1)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
            "mask": np.ones(batch_size, np.float32)}


def flat(prefix, tree):
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def probe(overrides: dict, steps: int = 1) -> dict:
    """tiny_config(**overrides) trained `steps` steps on `fixed_batch` on this process's
    devices: {"before[...]": ..., "after[...]": ...} of (params, batch_stats). The steps are
    steps 0, 1, ... of the run, so their keys (dropout, stochastic depth) are the trainer's."""
    config = tiny_config(**overrides)
    parallel = Parallel(config.parallel.backend)
    trainer = train.Trainer(config, parallel)
    state = trainer.init_state()
    before = parallel.unreplicate(state)
    acc = trainer.empty_accumulator()
    for _ in range(steps):
        state, acc = trainer.train_on_batch(state, parallel.shard(fixed_batch()), acc)
    after = parallel.unreplicate(state)
    return {**flat("before", (before.params, before.batch_stats)), **flat("after", (after.params, after.batch_stats))}


if __name__ == "__main__":
    out, steps, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    arrays = {"devices": jax.device_count()}
    for name, overrides in cases.items():
        arrays.update({f"{name}/{key}": value for key, value in probe(overrides, steps).items()})
    np.savez(out, **arrays)
