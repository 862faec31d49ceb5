"""Weight EMA (Polyak averaging) of the params and BN statistics: timm's `ModelEmaV3`.

The average is `TrainState.ema` ({"params", "batch_stats"}; None when `train.ema_decay`
is 0, so a run without it has the state, the checkpoints and the numbers it always had).
resnet_jax.steps updates it inside the jitted step from the weights after the update, which
every device computed from the same averaged gradients: it stays replicated with them.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def enabled(train: ml_collections.ConfigDict) -> bool:
    """Whether `config.train` asks for a weight EMA. Older runs' configs lack the field."""
    return bool(train.get("ema_decay", 0.0))


def initial(params: Any, batch_stats: Any) -> dict:
    """The average before any update: the weights themselves (timm copies the model)."""
    return {"params": params, "batch_stats": batch_stats}


def step_size_schedule(train: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """1 - decay as a function of the update count: timm's `ModelEmaV3.get_decay(step)`.

    timm (update_after_step=0, min_decay=0, `step` = the updates made, this one included):

        step = max(0, step - 1)
        if step <= 0: return 0.0
        decay = max(min(1 - (1 + step / warmup_gamma) ** -warmup_power, decay), 0)  # use_warmup
        decay = decay                                                                # otherwise

    So the first update copies the weights. This returns 1 - decay, computed as
    (1 + step / gamma) ** -power rather than as 1 minus a decay near 1 in float32, which
    would lose digits (1 - float32(0.9999) is 1.00017e-4: 1.7e-4 off, relative).
    """
    decay, gamma, power = train.ema_decay, train.ema_warmup_gamma, train.ema_warmup_power
    floor = 1.0 - decay  # in float64 on the host, then one rounding to float32

    def step_size(updates: jax.Array) -> jax.Array:
        step = jnp.maximum(jnp.asarray(updates, jnp.float32) - 1.0, 0.0)
        size = jnp.maximum((1.0 + step / gamma) ** -power, floor) if train.ema_warmup else jnp.float32(floor)
        return jnp.where(step <= 0, jnp.float32(1.0), size)

    return step_size


def update(ema: dict, params: Any, batch_stats: Any, step_size: jax.Array) -> dict:
    """ema + step_size * (weights - ema), written as optax's step_size * new + (1 - step_size) * old;
    step_size 1 gives the weights exactly."""
    return optax.incremental_update(initial(params, batch_stats), ema, step_size)
