"""Tests of `resnet_jax.models`: numbers that could be wrong, not just shapes.

Covered: exact parameter counts (published figures and a layer-by-layer formula), plain /
residual twins and shortcut options A/B/C, forward shapes of every registered model, float32
and bfloat16 compute, BatchNorm train/eval semantics, a gradient for every parameter,
zero-init of the residual branches, the registry's errors, bottleneck v1 vs v1.5, He
initialisation, and a ResNet-20 that memorises 64 random images.

Big models are only traced (`jax.eval_shape`), never initialised, so the file runs on a
2-core CPU in about two minutes. Real initialisation is cached per model: on CPU its cost
(~10 s a model) is XLA compiling one small program per parameter shape, not arithmetic.
"""

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models
from resnet_jax.models import blocks
from resnet_jax.models.resnet import IMAGENET_STAGES

# Published counts of `params` (convolutions, BN scale and bias, classifier weight and
# bias; BN running statistics excluded).
# torchvision (num_classes=1000): https://pytorch.org/vision/stable/models.html
# ResNet-200 is not in torchvision; 64,673,832 is the figure of tf-slim's resnet_v1_200 and
# pytorchcv's resnet200 (stages 3, 24, 36, 3) and what `imagenet_param_count` derives.
IMAGENET_PUBLISHED = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnet200": 64_673_832,
}
# He et al. 2015 CIFAR nets, option A, num_classes=10 (0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
CIFAR_PUBLISHED = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
}


# ---------------------------------------------------------------------------------------
# Expected parameter counts, derived from the architecture rather than from the code under test.


def conv_bn_params(c_in: int, c_out: int, kernel: int) -> int:
    """A bias-free kxk convolution followed by BatchNorm (scale and bias)."""
    return kernel * kernel * c_in * c_out + 2 * c_out


def cifar_param_count(depth: int, num_classes: int = 10, shortcut: str | None = "A") -> int:
    """Parameters of the He et al. CIFAR net of depth 6n+2 (16/32/64 filters).

    Args:
      depth: 6n+2.
      num_classes: classifier size.
      shortcut: "A", "B", "C", or None for the plain twin (no shortcut at all).
    """
    n = (depth - 2) // 6
    total = conv_bn_params(3, 16, 3)  # 3x3 stem
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_bn_params(c_in, width, 3) + conv_bn_params(width, width, 3)
            # In these nets the stride changes exactly where the width does.
            if shortcut == "C" or (shortcut == "B" and c_in != width):
                total += conv_bn_params(c_in, width, 1)
            c_in = width
    return total + c_in * num_classes + num_classes


def cifar_option_a_closed_form(depth: int) -> int:
    """`cifar_param_count(depth)` for option A and 10 classes, in closed form.

    With n = (depth - 2) / 6:
      stem              3*3*3*16 + 2*16                                   =       464
      stage 1 (16)      n * (2*9*16*16 + 2*2*16)                          =    4,672 n
      stage 2 (16->32)  9*16*32 + 9*32*32 + 4*32 = 13,952 for the first,
                        (n-1) * (2*9*32*32 + 4*32 = 18,560)               =   18,560 n - 4,608
      stage 3 (32->64)  9*32*64 + 9*64*64 + 4*64 = 55,552 for the first,
                        (n-1) * (2*9*64*64 + 4*64 = 73,984)               =   73,984 n - 18,432
      head              64*10 + 10                                        =       650
      total                                                               =   97,216 n - 21,926
    ResNet-20 (n=3): 269,722; ResNet-1202 (n=200): 19,421,274 ("19.4M" in He et al. Table 6).
    """
    n = (depth - 2) // 6
    return 97_216 * n - 21_926


def imagenet_param_count(
    stage_sizes: tuple[int, ...], bottleneck: bool, num_classes: int = 1000, shortcut: str | None = "B"
) -> int:
    """Parameters of an ImageNet ResNet (7x7 stem, widths 64..512, x4 expansion if bottleneck).

    `shortcut=None` is the plain twin. The bottleneck stride (v1 / v1.5) does not change it.
    """
    total = conv_bn_params(3, 64, 7)
    c_in = 64
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, (64, 128, 256, 512))):
        c_out = 4 * width if bottleneck else width
        for block in range(num_blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            if bottleneck:
                total += conv_bn_params(c_in, width, 1) + conv_bn_params(width, width, 3)
                total += conv_bn_params(width, c_out, 1)
            else:
                total += conv_bn_params(c_in, width, 3) + conv_bn_params(width, width, 3)
            if shortcut == "C" or (shortcut == "B" and (strides != 1 or c_in != c_out)):
                total += conv_bn_params(c_in, c_out, 1)
            c_in = c_out
    return total + c_in * num_classes + num_classes


# ---------------------------------------------------------------------------------------
# Helpers.


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def image_size(model: models.ResNet) -> int:
    """Cheap default input size: CIFAR nets at 32 px, ImageNet nets at 64 px."""
    return 32 if model.stem == "cifar" else 64


def depth_of(name: str) -> int:
    return int(re.sub(r"\D", "", name))


def abstract_init(name: str, num_classes: int = 10, size: int | None = None, **overrides) -> tuple:
    """(logits, variables) of `create(name, ...).init_with_output` as shapes only (no FLOPs).

    Inputs are 2 images of 32 px (CIFAR) or 224 px (ImageNet): tracing costs the same at
    any size, so the ImageNet nets see their real resolution. Variables include the
    `intermediates` sown by the model (stem and stage outputs).
    """
    return _abstract_init(name, num_classes, size, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _abstract_init(name, num_classes, size, overrides):
    # Cached: tracing ResNet-1202 takes seconds and several tests need it.
    model = models.create(name, num_classes=num_classes, **dict(overrides))
    size = size or (32 if model.stem == "cifar" else 224)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    # mutable=True keeps the sown `intermediates`, which `init` drops by default.
    init = lambda key, x: model.init_with_output(key, x, train=False, mutable=True)  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0), x)


def abstract_params(name: str, num_classes: int = 10, **overrides) -> dict:
    return abstract_init(name, num_classes, **overrides)[1]["params"]


def real_init(name: str, num_classes: int = 10, **overrides) -> dict:
    """Real {params, batch_stats} of `create(name, ...)`, seed 0; cached.

    Parameter shapes do not depend on the spatial size, so a tiny input keeps this cheap.
    """
    return _real_init(name, num_classes, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _real_init(name, num_classes, overrides):
    model = models.create(name, num_classes=num_classes, **dict(overrides))
    return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def images(n: int, size: int, seed: int = 1) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def record_calls(fn, *args, **kwargs) -> tuple[Any, dict]:
    """Runs fn and records (first positional input, output) of every module `__call__`.

    Returns:
      fn's result, and {module path (tuple of names): (input, output)}.
    """
    calls = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            calls[context.module.path] = (args[0] if args else None, out)
        return out

    with nn.intercept_methods(interceptor):
        result = fn(*args, **kwargs)
    return result, calls


def block_paths(model: models.ResNet) -> list[tuple[str]]:
    return [
        (f"stage{stage + 1}_block{block + 1}",)
        for stage, num_blocks in enumerate(model.stage_sizes)
        for block in range(num_blocks)
    ]


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ---------------------------------------------------------------------------------------
# 1. Exact parameter counts.


@pytest.mark.parametrize("name", sorted(IMAGENET_PUBLISHED))
def test_imagenet_param_count_matches_published(name):
    depth = depth_of(name)
    block_cls, stage_sizes = IMAGENET_STAGES[depth]
    expected = IMAGENET_PUBLISHED[name]
    # The formula reproduces the published figure, so it may be trusted for variants below.
    assert imagenet_param_count(stage_sizes, block_cls is models.Bottleneck) == expected
    assert count(abstract_params(name, num_classes=1000)) == expected


@pytest.mark.parametrize("name", sorted(CIFAR_PUBLISHED))
def test_cifar_param_count_matches_published(name):
    depth = depth_of(name)
    expected = CIFAR_PUBLISHED[name]
    assert cifar_param_count(depth) == cifar_option_a_closed_form(depth) == expected
    assert count(abstract_params(name)) == expected


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "plain26", "resnet38", "resnet1202"])
def test_any_6n_plus_2_depth_matches_formula(name):
    depth = depth_of(name)
    assert count(abstract_params(name)) == cifar_param_count(depth) == cifar_option_a_closed_form(depth)


def test_resnet1202_param_count():
    # 97,216 * 200 - 21,926 (see cifar_option_a_closed_form); He et al. Table 6: "19.4M".
    assert count(abstract_params("resnet1202")) == 19_421_274


def test_running_statistics_are_not_parameters():
    """batch_stats hold exactly a mean and a var for every BN scale and bias in params."""
    variables = abstract_init("resnet56")[1]
    bn_params = {
        path[:-1]: leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key in ("scale", "bias") and path[-2].key.startswith(("bn", "stem_bn", "proj_bn"))
    }
    stats = {path[:-1]: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
    assert stats == bn_params
    assert count(variables["batch_stats"]) == 2 * 16 + 9 * 2 * 2 * (16 + 32 + 64)


# ---------------------------------------------------------------------------------------
# 2. Plain twins and shortcut options.


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_twin_has_same_params_as_option_a(depth):
    plain, residual = abstract_params(f"plain{depth}"), abstract_params(f"resnet{depth}")
    assert jax.tree.structure(plain) == jax.tree.structure(residual)
    assert count(plain) == count(residual) == CIFAR_PUBLISHED[f"resnet{depth}"]


@pytest.mark.parametrize("depth", [18, 34])
def test_imagenet_plain_twin_lacks_only_the_projections(depth):
    block_cls, stage_sizes = IMAGENET_STAGES[depth]
    plain = count(abstract_params(f"plain{depth}", num_classes=1000))
    assert plain == imagenet_param_count(stage_sizes, bottleneck=False, shortcut=None)
    # Three option-B projections (64->128, 128->256, 256->512, 1x1 + BN scale and bias).
    projections = (64 * 128 + 2 * 128) + (128 * 256 + 2 * 256) + (256 * 512 + 2 * 512)
    assert IMAGENET_PUBLISHED[f"resnet{depth}"] - plain == projections == 173_824


def test_cifar_option_b_adds_two_projections():
    a = count(abstract_params("resnet20"))
    b = count(abstract_params("resnet20", shortcut="B"))
    # 16->32 and 32->64 1x1 convolutions, each followed by BN (scale + bias).
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64) == 2_752


def test_cifar_option_c_adds_a_projection_to_every_block():
    a = count(abstract_params("resnet20"))
    c = count(abstract_params("resnet20", shortcut="C"))
    stage1 = 3 * (16 * 16 + 2 * 16)  # identity-shaped projections still cost parameters
    stage2 = (16 * 32 + 2 * 32) + 2 * (32 * 32 + 2 * 32)
    stage3 = (32 * 64 + 2 * 64) + 2 * (64 * 64 + 2 * 64)
    assert c - a == stage1 + stage2 + stage3 == 14_240


@pytest.mark.parametrize(
    "name,shortcut",
    [("resnet56", "B"), ("resnet56", "C"), ("resnet110", "C"), ("resnet18", "A"), ("resnet18", "C"),
     ("resnet50", "A"), ("resnet50", "C"), ("resnet101", "C")],
)
def test_shortcut_option_param_counts_match_formula(name, shortcut):
    depth = depth_of(name)
    got = count(abstract_params(name, shortcut=shortcut))
    if models.model_family(name) == "cifar":
        assert got == cifar_param_count(depth, shortcut=shortcut)
    else:
        block_cls, stage_sizes = IMAGENET_STAGES[depth]
        assert got == imagenet_param_count(stage_sizes, block_cls is models.Bottleneck, 10, shortcut)


# ---------------------------------------------------------------------------------------
# 3. Forward: shapes of every registered model, dtypes, BatchNorm train / eval.


@pytest.mark.parametrize("name", models.available())
def test_every_registered_model_builds_with_expected_shapes(name):
    model = models.create(name)
    num_classes = 10 if model.stem == "cifar" else 1000
    logits, variables = abstract_init(name, num_classes=num_classes)
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
    sown = {key: value[0].shape for key, value in variables["intermediates"].items()}
    expansion = 4 if model.block_cls is models.Bottleneck else 1
    if model.stem == "cifar":
        assert sown == {"stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 16 * expansion),
                        "stage2": (2, 16, 16, 32 * expansion), "stage3": (2, 8, 8, 64 * expansion)}
    else:
        assert sown == {"stem": (2, 56, 56, 64), "stage1": (2, 56, 56, 64 * expansion),
                        "stage2": (2, 28, 28, 128 * expansion), "stage3": (2, 14, 14, 256 * expansion),
                        "stage4": (2, 7, 7, 512 * expansion)}


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
def test_float32_and_bfloat16_forward(name):
    """Real forward passes (ImageNet nets at 64 px): finite, and bf16 tracks float32.

    With bf16 compute, parameters and BN statistics must stay float32.
    """
    variables = real_init(name)
    model32 = models.create(name)
    model16 = models.create(name, dtype="bfloat16")
    assert model16.dtype == jnp.bfloat16
    x = images(2, image_size(model32))

    # Dtypes need no arithmetic: trace only.
    init16 = jax.eval_shape(lambda k: model16.init(k, x, train=False), jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(init16)} == {jnp.dtype(jnp.float32)}
    _, state = jax.eval_shape(
        lambda v: model16.apply(v, x, train=True, mutable=["batch_stats", "intermediates"]), variables
    )
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}
    assert state["intermediates"]["stage1"][0].dtype == jnp.bfloat16  # the compute really is bf16

    logits32 = jax.jit(functools.partial(model32.apply, train=False))(variables, x)
    logits16 = jax.jit(functools.partial(model16.apply, train=False))(variables, x)
    assert logits32.shape == logits16.shape == (2, 10)
    assert logits32.dtype == logits16.dtype == jnp.float32
    assert np.isfinite(logits32).all() and np.isfinite(logits16).all()
    # bf16 keeps ~3 significant digits; the measured error is under 1 % of the logit scale.
    scale = float(jnp.abs(logits32).max())
    assert scale > 0.1  # not a degenerate all-zero output
    np.testing.assert_allclose(logits16, logits32, atol=0.03 * scale)


def randomised_batch_stats(batch_stats: dict, seed: int = 0) -> dict:
    """Means ~ N(0, 0.5^2), variances ~ U(0.5, 2); the stem BN's log-uniform in [1e-6, 2].

    The stem's tiny variances make epsilon matter there; elsewhere they would compound
    over 19 layers into overflow.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch_stats)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for key, (path, leaf) in zip(keys, leaves):
        if path[-1].key == "mean":
            new.append(0.5 * jax.random.normal(key, leaf.shape))
        elif path[0].key == "stem_bn":
            new.append(10.0 ** jax.random.uniform(key, leaf.shape, minval=-6.0, maxval=0.3))
        else:
            new.append(jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0))
    return jax.tree_util.tree_unflatten(treedef, new)


def test_eval_uses_running_statistics():
    model = models.create("resnet20")
    variables = real_init("resnet20")
    stats = randomised_batch_stats(variables["batch_stats"])
    k_scale, k_bias = jax.random.split(jax.random.key(3))
    params = jax.tree.map(lambda a: a, variables["params"])  # shallow copy of the nested dicts
    params["stem_bn"] = {
        "scale": jax.random.uniform(k_scale, (16,), minval=0.5, maxval=1.5),
        "bias": jax.random.normal(k_bias, (16,)),
    }
    x = images(4, 32)

    logits, calls = record_calls(model.apply, {"params": params, "batch_stats": stats}, x, train=False)
    conv_out = calls[("stem_conv",)][1]
    bn_out = calls[("stem_bn",)][1]
    mean, var = stats["stem_bn"]["mean"], stats["stem_bn"]["var"]
    expected = (conv_out - mean) / jnp.sqrt(var + 1e-5) * params["stem_bn"]["scale"] + params["stem_bn"]["bias"]
    np.testing.assert_allclose(bn_out, expected, rtol=1e-5, atol=1e-5)

    logits_init_stats = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
    assert np.isfinite(logits).all()
    assert float(jnp.abs(logits - logits_init_stats).max()) > 1e-2


def test_eval_is_per_example_and_train_is_per_batch():
    model = models.create("resnet20")
    variables = real_init("resnet20")
    x = images(7, 32)
    batch_a, batch_b = x[:4], jnp.concatenate([x[:1], x[4:]])  # both start with example 0

    alone = model.apply(variables, x[:1], train=False)[0]
    for batch in (batch_a, batch_b):
        np.testing.assert_allclose(model.apply(variables, batch, train=False)[0], alone, rtol=1e-5, atol=1e-5)

    train_a, _ = model.apply(variables, batch_a, train=True, mutable=["batch_stats"])
    train_b, _ = model.apply(variables, batch_b, train=True, mutable=["batch_stats"])
    assert float(jnp.abs(train_a[0] - train_b[0]).max()) > 1e-3


def test_train_updates_running_statistics_with_momentum_0_9():
    model = models.create("resnet20")
    variables = real_init("resnet20")
    stats = randomised_batch_stats(variables["batch_stats"], seed=5)
    x = images(4, 32)
    (_, updated), calls = record_calls(
        model.apply, {"params": variables["params"], "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    conv_out = calls[("stem_conv",)][1]
    old, new = stats["stem_bn"], updated["batch_stats"]["stem_bn"]
    # flax: running = momentum * running + (1 - momentum) * batch (biased batch variance).
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv_out.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv_out.var((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_he_fan_out_initialisation():
    variables = real_init("resnet20")
    kernel = variables["params"]["stage3_block2"]["conv2"]["kernel"]
    assert kernel.shape == (3, 3, 64, 64)
    # Kaiming normal, fan-out: std = sqrt(2 / (3*3*64)) = 0.0589; 36,864 samples -> ~0.4% noise.
    np.testing.assert_allclose(float(kernel.std()), np.sqrt(2 / (9 * 64)), rtol=0.03)
    assert abs(float(kernel.mean())) < 0.002
    # ... and fan-out, not fan-in: on a kernel whose two differ (3x3x32 -> 64: fan-in 288,
    # fan-out 576), fan-in would give std sqrt(2 / 288) = 0.083, 41 % more; 18,432 samples.
    widening = variables["params"]["stage3_block1"]["conv1"]["kernel"]
    assert widening.shape == (3, 3, 32, 64)
    np.testing.assert_allclose(float(widening.std()), np.sqrt(2 / (9 * 64)), rtol=0.03)
    bn = variables["params"]["stage1_block1"]["bn2"]
    assert (bn["scale"] == 1).all() and (bn["bias"] == 0).all()
    stats = variables["batch_stats"]["stage1_block1"]["bn2"]
    assert (stats["mean"] == 0).all() and (stats["var"] == 1).all()


# ---------------------------------------------------------------------------------------
# 4. Every parameter gets a gradient.


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18", "resnet50"])
def test_every_parameter_gets_a_gradient(name):
    model = models.create(name)
    variables = real_init(name)
    # 32 px for every net; 8 examples so the 1x1 final stage of ImageNet nets still has a
    # batch to normalise over (with 2, BN outputs are +-1 whatever the input).
    x = images(8, 32)
    labels = jnp.arange(8) % 10

    def loss_fn(params):
        logits, state = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return cross_entropy(logits, labels), state["batch_stats"]

    (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.isfinite(g).all()) for _, g in leaves)
    no_grad = [jax.tree_util.keystr(path) for path, g in leaves if not bool((g != 0).any())]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    # Training mode also moved every running statistic.
    unchanged = [
        jax.tree_util.keystr(path)
        for (path, old), new in zip(
            jax.tree_util.tree_leaves_with_path(variables["batch_stats"]), jax.tree_util.tree_leaves(new_stats)
        )
        if bool((old == new).all())
    ]
    assert not unchanged, f"running statistics not updated: {unchanged}"


# ---------------------------------------------------------------------------------------
# 5. Zero-init of the residual branch.


def block_outputs_and_shortcuts(model: models.ResNet, variables: dict, x: jnp.ndarray) -> list:
    """[(block path, block output, relu(shortcut(block input)))] in train mode."""
    _, calls = record_calls(model.apply, variables, x, train=True, mutable=["batch_stats"])
    result = []
    for path in block_paths(model):
        block_in, block_out = calls[path]
        if path + ("proj_bn",) in calls:  # options B / C: the projection's BN output
            short = calls[path + ("proj_bn",)][1]
        else:  # identity, or option A's subsample + zero pad: parameter-free
            strides = block_in.shape[1] // block_out.shape[1]
            short = blocks.shortcut(block_in, block_out.shape[-1], strides, model.shortcut, conv=None, norm=None)
        result.append((path, block_out, nn.relu(short)))
    return result


@pytest.mark.parametrize(
    "name,overrides",
    [("resnet20", {}), ("resnet20", {"shortcut": "B"}), ("resnet18", {}), ("resnet50", {})],
    ids=["resnet20-A", "resnet20-B", "resnet18-B", "resnet50-B"],
)
def test_zero_init_residual_blocks_pass_the_shortcut(name, overrides):
    model = models.create(name, zero_init_residual=True, **overrides)
    variables = real_init(name, zero_init_residual=True, **overrides)
    last_bn = "bn3" if model.block_cls is models.Bottleneck else "bn2"
    for path in block_paths(model):
        params = variables["params"][path[0]]
        assert (params[last_bn]["scale"] == 0).all()
        assert (params["bn1"]["scale"] == 1).all()  # only the branch's last BN is zeroed
        if "proj_bn" in params:
            assert (params["proj_bn"]["scale"] == 1).all()

    results = block_outputs_and_shortcuts(model, variables, images(4, 32))
    assert len(results) == sum(model.stage_sizes)
    for path, block_out, expected in results:
        np.testing.assert_array_equal(block_out, expected, err_msg=str(path))


def test_without_zero_init_blocks_are_not_the_shortcut():
    """Control for the test above: the check can fail."""
    model = models.create("resnet20")
    results = block_outputs_and_shortcuts(model, real_init("resnet20"), images(4, 32))
    for path, block_out, expected in results:
        assert float(jnp.abs(block_out - expected).max()) > 1e-2, path


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16)
    y = blocks.shortcut(x, 32, 2, "A", conv=None, norm=None)
    assert y.shape == (2, 2, 2, 32)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert (y[..., :8] == 0).all() and (y[..., 24:] == 0).all()


@pytest.mark.parametrize("name", ["plain20", "plain56", "plain18"])
def test_zero_init_residual_refused_for_plain_nets(name):
    with pytest.raises(ValueError, match="zero"):
        models.create(name, zero_init_residual=True)


# ---------------------------------------------------------------------------------------
# 6. Registry.


def test_impossible_cifar_depth_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        models.create("resnet57")
    message = str(error.value)
    assert "6n+2" in message and "resnet56" in message and "resnet50" in message


@pytest.mark.parametrize(
    "name", ["vgg16", "resnet", "plain50x", "resnet57", "resnet2", "plain19", "ResNet20", "resnet-20", ""]
)
def test_unknown_names_raise(name):
    with pytest.raises(ValueError, match="unknown model"):
        models.create(name)


@pytest.mark.parametrize(
    "name,family",
    [("resnet18", "imagenet"), ("resnet50", "imagenet"), ("resnet200", "imagenet"), ("plain34", "imagenet"),
     ("resnet20", "cifar"), ("resnet1202", "cifar"), ("plain50", "cifar"), ("plain152", "cifar")],
)
def test_model_family(name, family):
    assert models.model_family(name) == family


@pytest.mark.parametrize("name", ["resnet8", "plain26", "resnet62", "plain98"])
def test_any_6n_plus_2_builds(name):
    depth = depth_of(name)
    model = models.create(name)
    n = (depth - 2) // 6
    assert model.stage_sizes == (n, n, n) and model.block_cls is models.BasicBlock
    assert model.skip == name.startswith("resnet")
    assert count(abstract_params(name)) == cifar_param_count(depth)


def test_family_override_builds_cifar_resnet50():
    model = models.create("resnet50", family="cifar")
    assert model.stage_sizes == (8, 8, 8) and model.block_cls is models.BasicBlock and model.stem == "cifar"
    assert count(abstract_params("resnet50", family="cifar")) == cifar_param_count(50) == 755_802
    assert models.create("resnet50").stage_sizes == (3, 4, 6, 3)


@pytest.mark.parametrize(
    "name,overrides",
    [("resnet20", {"family": "imagenet"}), ("resnet18", {"family": "cifar"}), ("resnet20", {"family": "mnist"}),
     ("resnet20", {"shortcut": "D"}), ("resnet50", {"bottleneck_stride": "v2"}), ("resnet20", {"stem": "tiny"})],
)
def test_bad_arguments_raise(name, overrides):
    with pytest.raises(ValueError):
        models.create(name, **overrides)


# ---------------------------------------------------------------------------------------
# 7. Bottleneck v1 (stride on the first 1x1) vs v1.5 (stride on the 3x3).


def test_bottleneck_v1_and_v1_5():
    v1 = models.create("resnet50", bottleneck_stride="v1")
    v15 = models.create("resnet50")
    assert v15.bottleneck_stride == "v1.5"
    params_v1, params_v15 = abstract_params("resnet50", bottleneck_stride="v1"), abstract_params("resnet50")
    assert jax.tree.structure(params_v1) == jax.tree.structure(params_v15)
    assert count(params_v1) == count(params_v15) == 23_528_522  # 25,557,032 - 2048*990 - 990

    x = images(2, 64)
    variables = real_init("resnet50")
    logits_v15, calls_v15 = record_calls(v15.apply, variables, x, train=False)
    logits_v1, calls_v1 = record_calls(v1.apply, variables, x, train=False)
    # At 64 px stage 2 receives 16x16 maps and emits 8x8.
    block = ("stage2_block1",)
    assert calls_v1[block + ("conv1",)][1].shape == (2, 8, 8, 128)  # the 1x1 strides
    assert calls_v15[block + ("conv1",)][1].shape == (2, 16, 16, 128)  # the 3x3 strides
    for calls in (calls_v1, calls_v15):
        assert calls[block + ("conv2",)][1].shape == (2, 8, 8, 128)
        assert calls[block][1].shape == (2, 8, 8, 512)
    assert float(jnp.abs(logits_v1 - logits_v15).max()) > 1e-2


# ---------------------------------------------------------------------------------------
# 8. Memorisation: the cheapest end-to-end check that forward, backward and BN fit together.

OVERFIT_MAX_STEPS = 100  # measured: 20-30 steps over seeds 0-4, so 3x margin
OVERFIT_CHECK_EVERY = 5


def test_resnet20_memorises_64_random_images():
    """ResNet-20 reaches 100 % accuracy on 64 random images with random labels.

    Accuracy is measured with train=False, i.e. with the running statistics, as at test
    time: the stricter choice, since train-mode accuracy (batch statistics) reaches 100 %
    first (~10 steps) while the running averages lag behind the changing weights.
    """
    model = models.create("resnet20")
    k_x, k_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k_x, (64, 32, 32, 3))
    labels = jax.random.randint(k_y, (64,), 0, 10)
    variables = real_init("resnet20")
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state):
        def loss_fn(params):
            logits, state = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return cross_entropy(logits, labels), state["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def eval_accuracy(params, batch_stats):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return (logits.argmax(-1) == labels).mean()

    first_loss = None
    for step in range(1, OVERFIT_MAX_STEPS + 1):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
        first_loss = first_loss if first_loss is not None else float(loss)
        if step % OVERFIT_CHECK_EVERY == 0 and float(eval_accuracy(params, batch_stats)) == 1.0:
            break
    else:
        pytest.fail(f"eval accuracy below 100 % after {OVERFIT_MAX_STEPS} steps (loss {float(loss):.3f})")
    print(f"memorised in {step} steps; loss {first_loss:.3f} -> {float(loss):.4f}")
    assert float(loss) < 0.1 < first_loss
