"""The checks to run on a new variant before a long run, one line each, exit 1 if any fails.

    python -m experiments.sanity --config=cifar:resnet20,npz --config.data.path=cifar10.npz

The config is given exactly as to resnet_jax.main (a file with its variant, plus
--config.x=y overrides). On the first --examples (64) images of the training split,
normalised as the trainer does and never augmented, with the trainer's own model, init
and optimiser:

  initial loss   the cross-entropy at initialisation (train-mode BN, as the first step sees
                 it) is within --loss_tolerance x ln(C) of ln(C), C = number of classes:
                 a net whose logits start with std s has loss about ln(C) + s^2/2, so 50 %
                 allows s up to about 1.5 for C = 10. Much higher means overconfident
                 logits at init (deep He-initialised ResNets without zero_init_residual
                 start there: the residual stream's variance grows with depth); much lower
                 means the labels leak into the input.
  gradients      every parameter array gets a non-zero, finite gradient at init or at the
                 second step (zero_init_residual zeroes a branch's gradients until its last
                 BN scale has moved once).
  overfit        the config's optimiser and lr schedule, full batch, reach 100 % accuracy on
                 those images within --max_steps steps; accuracy is measured with BN's
                 running statistics (test-time mode, the stricter one) every 5 steps.
  bf16 forward   the forward pass the trainer runs (train-mode BN) at init in bfloat16
                 matches float32: max |softmax difference| over the images and classes
                 <= --bf16_tolerance (probabilities, because logits' scales differ by orders
                 of magnitude between nets).
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from . import analysis_common as common
from resnet_jax import config as config_lib
from resnet_jax import optim, steps
from resnet_jax.data import device as device_data
from resnet_jax.data import sources
from resnet_jax.errors import UserError

FLAGS = flags.FlagValues()  # the module's own: the analyses can share a process (tests)
config_flags.DEFINE_config_file("config", None, "Config file with variant, e.g. configs/cifar.py:resnet20.",
                                flag_values=FLAGS, lock_config=True)
flags.DEFINE_integer("examples", 64, "Fixed training images the checks use.", flag_values=FLAGS)
flags.DEFINE_integer("max_steps", 300, "Steps allowed to reach 100 % accuracy on them.", flag_values=FLAGS)
flags.DEFINE_float("loss_tolerance", 0.5, "Allowed |initial loss - ln C|, as a fraction of ln C.",
                   flag_values=FLAGS)
flags.DEFINE_float("bf16_tolerance", 0.02, "Allowed max |softmax(bf16) - softmax(fp32)|.", flag_values=FLAGS)

CHECK_EVERY = 5  # steps between accuracy checks of the overfit (each is a host round trip)


class Check(NamedTuple):
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<18} {self.detail}"


def _setup(config):
    """The trainer's model, initial state, optimiser and the fixed normalised images."""
    config_lib.validate(config, jax.device_count())
    train = sources.load_split(config.data, config.data.train_split)
    mean, std = device_data.normalization_stats(config.data, train)
    steps_per_epoch = max(1, len(train.labels) // config.train.batch_size)
    total = config_lib.steps(config.train.total_steps, config.train.total_epochs, steps_per_epoch)
    schedule = optim.make_schedule(config.optim, steps_per_epoch, total)
    tx = optim.make_optimizer(config.optim, schedule)
    model = steps.build_model(config)
    state = steps.create_train_state(model, tx, config.train.seed, tuple(train.images.shape[1:]))
    return model, state, tx, schedule, train, (np.asarray(mean, np.float32), np.asarray(std, np.float32))


def _fixed_examples(train, stats, count: int) -> tuple[jax.Array, jax.Array]:
    if count > len(train.labels):
        raise UserError(f"--examples={count} is more than the {len(train.labels)} training examples")
    images = (train.images[:count].astype(np.float32) - stats[0]) / stats[1]
    return jnp.asarray(images, jnp.float32), jnp.asarray(train.labels[:count])


def run_checks(config, *, examples: int = 64, max_steps: int = 300, loss_tolerance: float = 0.5,
               bf16_tolerance: float = 0.02) -> list[Check]:
    """Runs the four checks on `config`; returns them in order (nothing is printed).

    Raises:
      UserError: a config that does not validate, or too few training examples.
    """
    if examples < 1 or max_steps < 1 or loss_tolerance <= 0 or bf16_tolerance <= 0:
        raise UserError("--examples and --max_steps must be >= 1, the tolerances positive")
    model, state, tx, schedule, train, stats = _setup(config)
    x, y = _fixed_examples(train, stats, examples)
    num_classes = config.data.num_classes
    dropout_key = jax.random.PRNGKey(config.train.seed + 1)

    batch = {"image": x, "label": y}

    @jax.jit
    def step(state, key):
        """The trainer's own step, on one device (no collectives)."""
        return steps.train_step(state, batch, key, model=model, tx=tx, bn_sync=True, axis_name=None)

    @jax.jit
    def gradients(state, key):
        """What that step's update starts from: its loss, logits and gradients."""
        loss, logits, _, grads = steps.loss_and_grads(state.params, state.batch_stats, batch, key, model=model)
        nonzero = jax.tree.map(lambda g: jnp.any(g != 0) & jnp.all(jnp.isfinite(g)), grads)
        zeros = sum(jnp.sum(g == 0) for g in jax.tree.leaves(grads))
        return loss, logits, nonzero, zeros

    @jax.jit
    def accuracy(params, batch_stats):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    checks = []

    # 1. Initial loss (the first step's forward pass is exactly it).
    key = lambda number: jax.random.fold_in(dropout_key, number - 1)  # the key of step `number` (1, 2, ...)
    first = gradients(state, key(1))
    loss0, logits0 = float(first[0]), np.asarray(first[1])
    expected = math.log(num_classes)
    allowed = loss_tolerance * expected
    checks.append(Check("initial loss", bool(abs(loss0 - expected) <= allowed),
                        f"{loss0:.4f} vs ln({num_classes}) = {expected:.4f} (|diff| {abs(loss0 - expected):.3f}, "
                        f"allowed {allowed:.3f} = {100 * loss_tolerance:g} % of ln C); logit std "
                        f"{float(np.std(logits0)):.3f}"))

    # 2 and 3. Train on the fixed images; gradients of the first two steps.
    initial = (state.params, state.batch_stats)
    nonzero_at_init, zeros_at_init = jax.device_get(first[2]), int(first[3])
    nonzero = nonzero_at_init
    state, _ = step(state, key(1))
    losses, reached, bad_step = [loss0], None, None
    for number in range(2, max_steps + 1):  # step 1 is done
        if number == 2:
            step_nonzero = gradients(state, key(2))[2]
            nonzero = jax.tree.map(lambda a, b: bool(a) or bool(b), nonzero, jax.device_get(step_nonzero))
        state, metrics = step(state, key(number))
        if number % CHECK_EVERY == 0 or number == max_steps:
            losses.append(float(metrics["loss"]))
            if not math.isfinite(losses[-1]):
                bad_step = number
                break
            if float(accuracy(state.params, state.batch_stats)) == 1.0:
                reached = number
                break
    flags_ = jax.tree.leaves(nonzero)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nonzero)]
    missing = [p for p, ok in zip(paths, flags_) if not ok]
    count = sum(int(np.size(p)) for p in jax.tree.leaves(initial[0]))
    detail = (f"{len(flags_) - len(missing)}/{len(flags_)} parameter arrays get a non-zero gradient "
              f"({sum(map(bool, jax.tree.leaves(nonzero_at_init)))} at init; {zeros_at_init:,} of {count:,} "
              f"numbers exactly zero at init)")
    if missing:
        detail += f"; none for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
    checks.append(Check("gradients", not missing, detail))

    lr0 = float(schedule(0))
    if reached is not None:
        detail = (f"100 % accuracy on {examples} images (running BN statistics) at step {reached} "
                  f"(limit {max_steps}); loss {loss0:.3f} -> {losses[-1]:.4f}; lr at step 0 {lr0:g}")
    elif bad_step is not None:
        detail = f"loss became {losses[-1]} by step {bad_step} (lr at step 0 {lr0:g}); no overfit"
    else:
        final_accuracy = float(accuracy(state.params, state.batch_stats))
        detail = (f"accuracy {100 * final_accuracy:.1f} % on {examples} images after "
                  f"{max_steps} steps (needs 100 %); loss {loss0:.3f} -> {losses[-1]:.4f}; lr at step 0 {lr0:g}")
    checks.append(Check(f"overfit {examples} images", reached is not None, detail))

    # 4. bf16 vs fp32, at init, in the trainer's (train-mode) forward pass.
    bf16 = model.clone(dtype=jnp.bfloat16)
    forward = lambda m: jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": dropout_key})[0])
    variables = {"params": initial[0], "batch_stats": initial[1]}
    fp32_logits = np.asarray(forward(model)(variables), np.float64)
    bf16_logits = np.asarray(forward(bf16)(variables), np.float64)
    softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    worst = float(np.max(np.abs(softmax(bf16_logits) - softmax(fp32_logits))))
    relative = float(np.linalg.norm(bf16_logits - fp32_logits) / (np.linalg.norm(fp32_logits) + 1e-30))
    agree = int(np.sum(bf16_logits.argmax(-1) == fp32_logits.argmax(-1)))
    checks.append(Check("bf16 forward", bool(worst <= bf16_tolerance),
                        f"max |softmax bf16 - fp32| {worst:.4f} (allowed {bf16_tolerance:g}); logits differ by "
                        f"{100 * relative:.2f} % (L2, relative); top-1 agrees on {agree}/{examples}"))
    return checks


def run(argv: list[str]) -> int:
    """The command: one line per check, exit 1 if any fails."""
    common.parse_flags(FLAGS, argv, __doc__)
    if FLAGS["config"].value is None:
        raise UserError("--config is required, e.g. --config=configs/cifar.py:resnet20")
    try:
        config = FLAGS.config
        config.model  # config files load lazily: a broken one fails here, as one line
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UserError(f"bad --config: {lines[-1] if lines else type(error).__name__}") from None
    print(f"sanity: {config.model.name} on {config.data.name} ({config.data.source}), {FLAGS.examples} "
          f"training images, {jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)
    checks = run_checks(config, examples=FLAGS.examples, max_steps=FLAGS.max_steps,
                        loss_tolerance=FLAGS.loss_tolerance, bf16_tolerance=FLAGS.bf16_tolerance)
    for check in checks:
        print(check.line(), flush=True)
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; failed: {', '.join(failed)}"
                                                                            if failed else ""), flush=True)
    return common.CHECK_FAILED_EXIT if failed else 0


def main(argv: list[str] | None = None) -> None:
    common.cli(run, argv)


if __name__ == "__main__":
    main(sys.argv)
