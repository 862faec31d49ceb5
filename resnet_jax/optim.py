"""Optax optimisers (SGD, Adam, LARS, LAMB) and learning-rate schedules, built from `config.optim`."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax import config as config_lib


def _main_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
    """The schedule after warm-up. Step-based decays use absolute steps (He et al. decay at
    32k and 48k whether or not ResNet-110 warmed up for 400); the shaped ones (cosine,
    cyclical) span the steps left after warm-up."""
    lr, warmup = optim.lr, config_lib.steps(optim.warmup_steps, optim.warmup_epochs, steps_per_epoch)
    if optim.schedule == "constant":
        return optax.constant_schedule(lr)
    if optim.schedule == "multistep":
        scale = {"fraction": total_steps, "epochs": steps_per_epoch, "steps": 1}[optim.boundaries_unit]
        boundaries = [round(b * scale) for b in optim.boundaries]
        return optax.piecewise_constant_schedule(lr, {b: optim.decay_factor for b in boundaries})
    if optim.schedule == "step":
        every = optim.step_every_epochs * steps_per_epoch
        return optax.exponential_decay(lr, every, optim.decay_factor, staircase=True)
    span = total_steps - warmup
    if optim.schedule == "cosine":
        shaped = optax.cosine_decay_schedule(lr, span, alpha=optim.min_lr / lr)
    elif optim.schedule == "linear":  # FFCV's ImageNet recipes: after the warm-up, straight down to min_lr
        shaped = optax.linear_schedule(lr, optim.min_lr, span)
    elif optim.schedule == "onecycle":
        shaped = optax.cosine_onecycle_schedule(span, lr)
    else:  # triangular (Smith 2017): min_lr -> lr -> min_lr every cycle_steps; optax has none.
        half = optim.cycle_steps / 2

        def shaped(step):
            phase = jnp.abs(jnp.mod(step, optim.cycle_steps) / half - 1.0)  # 1 -> 0 -> 1
            return optim.min_lr + (lr - optim.min_lr) * (1.0 - phase)

    return lambda step: shaped(jnp.maximum(step - warmup, 0))


def make_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the number of updates already made.

    Args:
      optim: `config.optim` (schedule, lr, boundaries, warm-up, ...).
      steps_per_epoch: to convert epoch-based settings to steps.
      total_steps: the length of training, for the shaped schedules.
    """
    main = _main_schedule(optim, steps_per_epoch, total_steps)
    warmup = config_lib.steps(optim.warmup_steps, optim.warmup_epochs, steps_per_epoch)
    if not warmup:
        return main
    if optim.warmup == "constant":  # He et al.'s ResNet-110: 0.01 until training gets going
        warm = optax.constant_schedule(optim.warmup_lr)
    else:
        warm = optax.linear_schedule(optim.warmup_lr, optim.lr, warmup)
    return lambda step: jnp.where(step < warmup, warm(step), main(step))


def decay_mask(params, decay_bn_and_bias: bool):
    """True where weight decay applies: everything, or only conv/dense kernels (ndim > 1)."""
    return jax.tree.map(lambda p: decay_bn_and_bias or p.ndim > 1, params)


def adapted_mask(params):
    """True where LARS/LAMB adapt the step to the layer (the trust ratio): conv/dense kernels.
    BN scales/biases and biases keep a trust ratio of 1, as in You et al.'s ResNet runs."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _lamb(optim: ml_collections.ConfigDict, schedule: optax.Schedule, mask) -> optax.GradientTransformation:
    """optax.lamb with a trust-ratio mask, which optax.lamb lacks: its own steps, the ratio
    masked as optax.lars masks it. Adam's defaults (b1 0.9, b2 0.999, eps 1e-6) are the paper's."""
    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
        optax.add_decayed_weights(optim.weight_decay, mask),  # decoupled: after Adam, inside the ratio
        optax.masked(optax.scale_by_trust_ratio(), adapted_mask),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum (optionally Nesterov) or Adam after coupled weight decay (the paper's
    L2 term: added to the gradient before momentum); or LARS or LAMB with their own.

    LARS and LAMB apply `optim.weight_decay` themselves, inside the trust ratio (LARS adds it
    to the gradient before the ratio and momentum; LAMB, decoupled, to Adam's step before
    the ratio), so no L2 term is added in front of them: the decay is applied once. Which
    parameters are decayed is `decay_mask` for every optimiser; which are layer-adapted is
    `adapted_mask`.
    """
    mask = lambda params: decay_mask(params, optim.decay_bn_and_bias)
    if optim.name == "lars":
        return optax.lars(schedule, weight_decay=optim.weight_decay, weight_decay_mask=mask,
                          trust_coefficient=optim.trust_coefficient, trust_ratio_mask=adapted_mask,
                          momentum=optim.momentum, nesterov=optim.nesterov)
    if optim.name == "lamb":
        return _lamb(optim, schedule, mask)
    if optim.name == "sgd":
        base = optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov)
    else:
        base = optax.adam(schedule)
    return optax.chain(optax.add_decayed_weights(optim.weight_decay, mask), base)
