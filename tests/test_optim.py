"""resnet_jax.optim beyond tests/test_train.py's schedule checks (the cases
mutation testing showed untested): boundaries in epochs and steps, warm-up in epochs, the cosine and cyclical
floors, which parameters are decayed, momentum, Nesterov and Adam; LARS and LAMB against optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar
from resnet_jax import optim


def _optim(**fields):
    config = cifar.get_config("resnet20").optim
    config.update(fields)
    return config


@pytest.mark.parametrize("unit,boundaries,steps_per_epoch,drops_at", [
    ("epochs", (3, 6), 10, (30, 60)), ("steps", (25, 70), 10, (25, 70)), ("fraction", (0.5, 0.75), 10, (50, 75)),
])
def test_multistep_boundary_units(unit, boundaries, steps_per_epoch, drops_at):
    schedule = optim.make_schedule(_optim(boundaries_unit=unit, boundaries=boundaries), steps_per_epoch, 100)
    first, second = drops_at
    for step, lr in ((first - 1, 0.1), (first, 0.01), (second - 1, 0.01), (second, 0.001)):
        assert float(schedule(step)) == pytest.approx(lr), (unit, step)


def test_warmup_in_epochs():
    config = _optim(schedule="cosine", warmup_epochs=2.0, warmup="linear", warmup_lr=0.0)
    schedule = optim.make_schedule(config, 10, 120)
    assert float(schedule(10)) == pytest.approx(0.05)  # halfway through 20 warm-up steps
    assert float(schedule(20)) == pytest.approx(0.1)
    assert float(schedule(70)) == pytest.approx(0.05)  # cosine over the 100 steps after warm-up


def test_cosine_and_triangular_floors():
    cosine = optim.make_schedule(_optim(schedule="cosine", min_lr=0.02), 10, 100)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.02)
    assert float(cosine(50)) == pytest.approx(0.06)
    triangular = optim.make_schedule(_optim(schedule="triangular", min_lr=0.02, cycle_steps=40), 10, 100)
    for step, lr in ((0, 0.02), (10, 0.06), (20, 0.1), (30, 0.06), (40, 0.02)):
        assert float(triangular(step)) == pytest.approx(lr), step


def test_linear_decay_after_warmup_is_ffcvs_triangle():
    # FFCV's "cyclic" lr: 1e-4 x peak at step 0, the peak after 2 epochs, 0 at the end.
    config = _optim(schedule="linear", lr=1.7, warmup_epochs=2.0, warmup="linear", warmup_lr=1.7e-4)
    schedule = optim.make_schedule(config, 10, 160)
    for step, lr in ((0, 1.7e-4), (10, (1.7 + 1.7e-4) / 2), (20, 1.7), (90, 0.85), (160, 0.0)):
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-6), step
    floor = optim.make_schedule(_optim(schedule="linear", min_lr=0.02), 10, 100)
    assert float(floor(50)) == pytest.approx(0.06) and float(floor(100)) == pytest.approx(0.02)


def test_decay_mask_decays_kernels_of_any_rank():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "conv": {"kernel": jnp.ones((3, 3, 1, 2))}}
    assert optim.decay_mask(params, False) == {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": True}}
    config = _optim(decay_bn_and_bias=True, weight_decay=0.5, momentum=0.0, lr=1.0)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 10))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(updates["dense"]["bias"][0]) == pytest.approx(-0.5)  # decayed too when asked


def _two_updates(**fields):
    config = _optim(weight_decay=0.0, schedule="constant", lr=0.1, **fields)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 10))
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    return np.asarray(first["w"]), np.asarray(second["w"]), np.asarray(grads["w"])


def test_momentum_nesterov_and_adam():
    first, second, g = _two_updates(momentum=0.9)
    np.testing.assert_allclose(first, -0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(second, -0.1 * 1.9 * g, rtol=1e-6)  # trace = g + 0.9 g
    first, second, g = _two_updates(momentum=0.9, nesterov=True)
    np.testing.assert_allclose(first, -0.1 * 1.9 * g, rtol=1e-6)  # g + 0.9 * trace
    np.testing.assert_allclose(second, -0.1 * (g + 0.9 * 1.9 * g), rtol=1e-6)
    first, second, g = _two_updates(momentum=0.0)
    np.testing.assert_allclose(second, -0.1 * g, rtol=1e-6)  # plain SGD
    first, _, g = _two_updates(name="adam")
    np.testing.assert_allclose(first, -0.1 * np.sign(g), rtol=1e-4)  # Adam's first step: lr * sign


# -- LARS and LAMB ----------------------------------------------------------------------

def _toy_params_and_grads():
    """Kernels (adapted, decayed) beside BN scales/biases and a dense bias (neither, with
    decay_bn_and_bias=False), at scales whose trust ratios are far from 1."""
    keys = jax.random.split(jax.random.PRNGKey(0), 15)
    shapes = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)},
              "head": {"kernel": (4, 3), "bias": (3,)}}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    params = treedef.unflatten([3.0 * jax.random.normal(k, s) for k, s in zip(keys, leaves)])
    grads = [treedef.unflatten([0.1 * jax.random.normal(k, s) for k, s in zip(keys[5 + 5 * i:], leaves)]) for i in (0, 1)]
    return params, grads


def _two_steps(tx, params, grads):
    """The updates of two steps (the second sees momentum / Adam's moments)."""
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


KERNELS = (("conv", "kernel"), ("head", "kernel"))
BN_AND_BIAS = (("bn", "scale"), ("bn", "bias"), ("head", "bias"))


def _leaf(tree, path):
    return np.asarray(tree[path[0]][path[1]])


def test_lamb_is_optaxs_on_kernels_and_plain_adam_on_bn_and_biases():
    config = _optim(name="lamb", schedule="constant", lr=0.1, weight_decay=0.05, decay_bn_and_bias=False)
    params, grads = _toy_params_and_grads()
    ours = _two_steps(optim.make_optimizer(config, optim.make_schedule(config, 1, 10)), params, grads)
    mask = optim.decay_mask(params, False)
    # optax.lamb adapts every leaf (it has no trust-ratio mask): its kernels are ours, decayed once.
    lamb = _two_steps(optax.lamb(0.1, weight_decay=0.05, mask=mask), params, grads)
    # BN and biases: trust ratio 1 and no decay, i.e. Adam with LAMB's eps.
    adam = _two_steps(optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-6), params, grads)
    for step in range(2):
        for path in KERNELS:
            np.testing.assert_array_equal(_leaf(ours[step], path), _leaf(lamb[step], path))
            assert not np.allclose(_leaf(ours[step], path), _leaf(adam[step], path))  # the ratio is not 1
        for path in BN_AND_BIAS:
            np.testing.assert_array_equal(_leaf(ours[step], path), _leaf(adam[step], path))


def test_lamb_decaying_bn_and_bias_still_leaves_them_unadapted():
    config = _optim(name="lamb", schedule="constant", lr=0.1, weight_decay=0.05, decay_bn_and_bias=True)
    params, grads = _toy_params_and_grads()
    ours = _two_steps(optim.make_optimizer(config, optim.make_schedule(config, 1, 10)), params, grads)
    lamb = _two_steps(optax.lamb(0.1, weight_decay=0.05), params, grads)
    decoupled = _two_steps(optax.chain(optax.scale_by_adam(eps=1e-6), optax.add_decayed_weights(0.05),
                                       optax.scale_by_learning_rate(0.1)), params, grads)
    for path in KERNELS:
        np.testing.assert_array_equal(_leaf(ours[1], path), _leaf(lamb[1], path))
    for path in BN_AND_BIAS:
        np.testing.assert_array_equal(_leaf(ours[1], path), _leaf(decoupled[1], path))


def test_lars_is_optaxs_with_the_same_masks_and_plain_sgd_on_bn_and_biases():
    config = _optim(name="lars", schedule="constant", lr=0.5, weight_decay=0.01, decay_bn_and_bias=False,
                    momentum=0.9, trust_coefficient=0.02)
    params, grads = _toy_params_and_grads()
    ours = _two_steps(optim.make_optimizer(config, optim.make_schedule(config, 1, 10)), params, grads)
    lars = _two_steps(optax.lars(0.5, weight_decay=0.01, weight_decay_mask=optim.decay_mask(params, False),
                                 trust_coefficient=0.02, trust_ratio_mask=optim.adapted_mask(params), momentum=0.9),
                      params, grads)
    sgd = _two_steps(optax.sgd(0.5, momentum=0.9), params, grads)
    assert jax.tree.leaves(optim.adapted_mask(params)) == [False, False, True, False, True]  # bn, conv, head
    for step in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours[step]), jax.tree.leaves(lars[step])))
        for path in BN_AND_BIAS:  # trust ratio 1, no decay: momentum SGD
            np.testing.assert_allclose(_leaf(ours[step], path), _leaf(sgd[step], path), rtol=1e-6)
        for path in KERNELS:
            assert not np.allclose(_leaf(ours[step], path), _leaf(sgd[step], path))
