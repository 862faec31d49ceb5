"""Run as a script in a subprocess with N fake devices (or imported, on one): Mixup/CutMix of
a fixed batch through the per-device mapping, each device's lambda and box kept apart; then
two training steps with mixing on. python mix_probe.py OUT.npz WORKDIR"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from one_step_probe import fixed_batch
from resnet_jax import train
from resnet_jax.data import mix
from resnet_jax.parallel import Parallel

MIXING = {"data.mixup_alpha": 1.0, "data.cutmix_alpha": 1.0}
# Two steps, as tests/test_parallel.py compares device counts; no evaluation (not compared).
TWO_STEPS = {**MIXING, "train.total_steps": 2, "train.log_every": 1, "train.checkpoint_every": 2,
             "data.eval_splits": ""}
KEYS = 8  # batches mixed with keys 0..7: Mixup and CutMix both among them


def mixed_batches() -> dict:
    """{"image", "target", "label": [KEYS, global batch, ...], "lam", "cutmix", "box": [KEYS,
    devices, ...]}: every key's mixed global batch and what each device drew."""
    config, parallel = tiny_config(**MIXING), Parallel()

    def per_device(batch, key):
        drawn = mix.draw(key, config.data, batch["image"].shape[1], batch["image"].shape[2])
        mixed = mix.apply(batch, drawn, config.data.num_classes)
        return ({k: mixed[k] for k in ("image", "target", "label")},
                {"lam": drawn.lam[None], "cutmix": drawn.cutmix[None], "box": jnp.stack(drawn.box)[None]})

    mapped = parallel.wrap(per_device, (0, None), (0, 0))
    batch = parallel.shard(fixed_batch())
    outs = [jax.device_get(mapped(batch, parallel.replicate(np.asarray(jax.random.PRNGKey(k))))) for k in range(KEYS)]
    return {name: np.stack([o[part][name] for o in outs]) for part, names in ((0, ("image", "target", "label")),
                                                                            (1, ("lam", "cutmix", "box")))
            for name in names}


if __name__ == "__main__":
    out, workdir = sys.argv[1], sys.argv[2]
    np.savez(out, **mixed_batches(), devices=jax.device_count())
    train.train_and_evaluate(tiny_config(**TWO_STEPS), workdir)
