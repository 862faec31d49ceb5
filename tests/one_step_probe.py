"""Run as a script in a subprocess with N fake devices: one train step of the tiny model on
a fixed batch, through `Trainer.train_on_batch` (the per-device step under shard_map or pmap).
Writes the state before and after to an .npz: python one_step_probe.py BACKEND BN_SYNC OUT"""

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


if __name__ == "__main__":
    backend, bn_sync, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    config = tiny_config(**{"parallel.backend": backend, "model.bn_sync": bn_sync})
    parallel = Parallel(backend)
    trainer = train.Trainer(config, parallel)
    state = trainer.init_state()
    before = parallel.unreplicate(state)
    acc = trainer.empty_accumulator()
    state, acc = trainer.train_on_batch(state, parallel.shard(fixed_batch()), acc)
    after = parallel.unreplicate(state)
    np.savez(out, **flat("before", (before.params, before.batch_stats)),
             **flat("after", (after.params, after.batch_stats)), devices=parallel.num_devices)
