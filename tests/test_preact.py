"""Tests of He et al. 2016's pre-activation nets, its shortcut and activation ablations, and
Huang et al.'s stochastic depth (`resnet_jax.models`).

Independent sources: parameter counts from timm 1.0.31's ResNetV2 (torch 2.13.0 CPU), and a
forward pass of a small timm ResNetV2 with copied weights (tests/fixtures/timm_preact.npz,
made by scripts/make_timm_preact_fixture.py: torch and timm are not dependencies); every
activation ordering against a NumPy reference of one unit written from the paper's Fig. 4.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.models import blocks
from resnet_jax.models.resnet import ResNet

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "timm_preact.npz")

# timm 1.0.31, sum(p.numel() for p in model.parameters()): `timm.create_model(name)` for
# resnetv2_18 ... resnetv2_152 (num_classes 1000); ResNetV2(layers=[3, 24, 36, 3],
# conv_layer=create_conv2d, norm_layer=BatchNormAct2d) for resnetv2_200 (timm registers no
# resnetv2_200); the CIFAR nets as ResNetV2(layers=[n] * 3, channels=(64, 128, 256),
# stem_chs=16, num_classes=10, ...) with the stem replaced by one bias-free 3x3 convolution,
# which is the authors' resnet-pre-act.lua net (the paper says 1.7M and 10.2M).
TIMM_COUNTS = {
    "resnetv2_18": 11_687_720,
    "resnetv2_34": 21_795_880,
    "resnetv2_50": 25_549_352,
    "resnetv2_101": 44_541_480,
    "resnetv2_152": 60_185_128,
    "resnetv2_200": 64_666_152,
    "preresnet164": 1_703_258,
    "preresnet1001": 10_327_706,
}
# preresnet110 with option A has exactly resnet110's count: it loses the stem BN (32) and
# 16 + 32 BN channels where stages widen (the first BN now sees the narrower input: 96), and
# gains the final BN over 64 channels (128). With projections (option B) it is timm's
# ResNetV2(layers=[18] * 3, channels=(16, 32, 64), basic=True, bottle_ratio=1.0) with the
# CIFAR stem: 1,730,522.
PREACT_110_A = 1_727_962
PREACT_110_B_TIMM = 1_730_522


def param_count(model, size: int) -> int:
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def count(name: str, **overrides) -> int:
    imagenet = models.model_family(name) == "imagenet"
    return param_count(models.create(name, num_classes=1000 if imagenet else 10, **overrides), 224 if imagenet else 32)


@pytest.mark.parametrize("name", sorted(TIMM_COUNTS))
def test_param_counts_match_timm(name):
    assert count(name) == TIMM_COUNTS[name]


def test_preresnet110_counts():
    assert count("preresnet110") == PREACT_110_A == count("resnet110")
    assert count("preresnet110", shortcut="B") == PREACT_110_B_TIMM


@pytest.mark.parametrize("name", ["preresnet20", "preresnet110"])
def test_basic_plain_twins_have_equal_counts(name):
    assert count(name.replace("resnet", "plain")) == count(name)


@pytest.mark.parametrize("plain,residual,projections", [
    ("preplain164", "preresnet164", 16 * 64 + 64 * 128 + 128 * 256),
    ("plainv2_50", "resnetv2_50", 64 * 256 + 256 * 512 + 512 * 1024 + 1024 * 2048)])
def test_bottleneck_plain_twins_lack_only_the_projections(plain, residual, projections):
    """The projections of a pre-activation unit are bare 1x1 convolutions (no BN)."""
    assert count(residual) - count(plain) == projections


def test_preact_structure():
    """Stem = the convolution alone; BN before each conv; final BN; v2 bottlenecks."""
    model = models.create("preresnet164")
    assert model.block_cls is blocks.Bottleneck and model.stage_sizes == (18, 18, 18) and model.shortcut == "B"
    assert models.create("preresnet110").block_cls is blocks.BasicBlock
    variables = jax.eval_shape(lambda: models.create("preresnet20").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    params = variables["params"]
    assert "stem_bn" not in params and params["final_bn"]["scale"].shape == (64,)
    assert set(params["stage2_block1"]) == {"bn1", "conv1", "bn2", "conv2"}
    assert params["stage2_block1"]["bn1"]["scale"].shape == (16,)  # normalises the unit's input
    # resnet110 with full pre-activation units is preresnet110.
    tree = lambda m: jax.tree.map(lambda x: x.shape, jax.eval_shape(
        lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)))
    assert tree(models.create("resnet20", activation_order="full_preact")) == tree(models.create("preresnet20"))


def test_first_preact_unit_normalises_before_splitting():
    """He et al. 2016, Sec. 4.1: the first unit's BN + ReLU comes before the split, so with
    F = 0 (zero-init) the first unit outputs ReLU(BN(stem)), not the raw stem output; a later
    identity unit passes its input through untouched."""
    model = models.create("preresnet14", zero_init_residual=True)
    variables = model.init(jax.random.PRNGKey(0), IMAGES, train=False)
    _, state = model.apply(variables, IMAGES, train=False, mutable=["intermediates"])
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    np.testing.assert_allclose(inter["stage1"], np.maximum(inter["stem"], 0) / np.sqrt(1 + 1e-5), rtol=1e-6,
                               atol=1e-6)
    assert inter["stem"].min() < 0


@pytest.mark.parametrize("name,family", [("preresnet110", "cifar"), ("preresnet1001", "cifar"),
                                         ("resnetv2_50", "imagenet"), ("plainv2_18", "imagenet")])
def test_preact_families(name, family):
    assert models.model_family(name) == family


def test_experiments_depth_rule_is_the_models():
    """experiments/runs restates the CIFAR depth rule (so a bad --depths is told before JAX
    loads): it must name the unit the model builds, for every depth up to 1,010."""
    from experiments import runs
    from resnet_jax.models.resnet import _preact_cifar_block

    for depth in range(1, 1011):
        built = _preact_cifar_block(depth)
        expected = None if built is None else ("bottleneck" if built[0] is blocks.Bottleneck else "basic")
        assert runs.cifar_block(depth, preact=True) == expected, depth
        assert runs.cifar_block(depth) == (None if depth < 8 or (depth - 2) % 6 else "basic"), depth


@pytest.mark.parametrize("name", ["preresnet111", "preresnet7", "resnetv2_56", "resnetv2_", "preresnet_110"])
def test_bad_preact_names(name):
    with pytest.raises(ValueError, match="unknown model"):
        models.create(name)


def test_preresnet_refuses_the_other_family():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("preresnet110", family="imagenet")


# ---------------------------------------------------------------------------------------
# The pre-activation forward pass against timm.


def _from_timm(arrays) -> dict:
    """timm state_dict (torch layouts) -> flax variables of the same net."""
    params, stats = {}, {}

    def put(tree, path, value):
        *parents, leaf = path
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[leaf] = jnp.asarray(value)

    def conv(name):
        return np.transpose(arrays[f"w:{name}.weight"], (2, 3, 1, 0))

    def bn(prefix, name):
        put(params, (*prefix, "scale"), arrays[f"w:{name}.weight"])
        put(params, (*prefix, "bias"), arrays[f"w:{name}.bias"])
        put(stats, (*prefix, "mean"), arrays[f"w:{name}.running_mean"])
        put(stats, (*prefix, "var"), arrays[f"w:{name}.running_var"])

    put(params, ("stem_conv", "kernel"), conv("stem"))
    for stage, blocks_in_stage in enumerate((2, 1, 1)):
        for block in range(blocks_in_stage):
            ours, theirs = f"stage{stage + 1}_block{block + 1}", f"stages.{stage}.blocks.{block}"
            for i in (1, 2, 3):
                bn((ours, f"bn{i}"), f"{theirs}.norm{i}")
                put(params, (ours, f"conv{i}", "kernel"), conv(f"{theirs}.conv{i}"))
            if f"w:{theirs}.downsample.conv.weight" in arrays:
                put(params, (ours, "proj_conv", "kernel"), conv(f"{theirs}.downsample.conv"))
    bn(("final_bn",), "norm")
    put(params, ("head", "kernel"), arrays["w:head.fc.weight"][:, :, 0, 0].T)
    put(params, ("head", "bias"), arrays["w:head.fc.bias"])
    return {"params": params, "batch_stats": stats}


def test_preact_bottleneck_forward_matches_timm():
    arrays = dict(np.load(FIXTURE))
    model = ResNet(stage_sizes=(2, 1, 1), block_cls=blocks.Bottleneck, num_classes=5, widths=(8, 16, 32),
                   stem="cifar", stem_width=8, shortcut="B", activation_order="full_preact", bottleneck_stride="v1.5")
    variables = _from_timm(arrays)
    ours = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), arrays["input_nhwc"], train=False))
    assert jax.tree.map(lambda x: x.shape, ours) == jax.tree.map(lambda x: x.shape, variables)
    assert param_count(model, 16) == int(arrays["param_count"])
    logits = model.apply(variables, arrays["input_nhwc"], train=False)
    np.testing.assert_allclose(logits, arrays["logits_eval"], rtol=1e-4, atol=1e-4)
    logits, _ = model.apply(variables, arrays["input_nhwc"], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, arrays["logits_train"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# The activation orderings against a NumPy reference of one unit (eval mode: BN is affine).


def _np_conv3x3(x, kernel):
    """x: (N, H, W, C), kernel (3, 3, C, K), stride 1, zero padding 1."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return sum(np.einsum("nhwc,ck->nhwk", padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
               for dy in range(3) for dx in range(3))


def _np_unit(order, x, p, s, eps=1e-5):
    """He et al. 2016, Fig. 4 (a)-(e), for a basic unit with an identity shortcut."""
    relu = lambda v: np.maximum(v, 0)
    bn = lambda v, name: (v - s[name]["mean"]) / np.sqrt(s[name]["var"] + eps) * p[name]["scale"] + p[name]["bias"]
    conv = lambda v, name: _np_conv3x3(v, p[name]["kernel"])
    if order == "original":
        return relu(x + bn(conv(relu(bn(conv(x, "conv1"), "bn1")), "conv2"), "bn2"))
    if order == "bn_after_add":
        return relu(bn(x + conv(relu(bn(conv(x, "conv1"), "bn1")), "conv2"), "bn_add"))
    if order == "relu_before_add":
        return x + relu(bn(conv(relu(bn(conv(x, "conv1"), "bn1")), "conv2"), "bn2"))
    if order == "relu_preact":
        return x + bn(conv(relu(bn(conv(relu(x), "conv1"), "bn1")), "conv2"), "bn2")
    assert order == "full_preact"
    return x + conv(relu(bn(conv(relu(bn(x, "bn1")), "conv1"), "bn2")), "conv2")


def _random_variables(variables, seed=0):
    """Every parameter and BN statistic random (variance positive), so nothing is trivially 0/1."""
    leaves, tree = jax.tree.flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        value = rng.uniform(0.5, 1.5, leaf.shape) if path[-1].key == "var" else rng.normal(0, 0.5, leaf.shape)
        out.append(jnp.asarray(value, jnp.float32))
    return jax.tree.unflatten(tree, out)


def _block(**kwargs):
    conv = functools.partial(nn.Conv, use_bias=False, padding=1)
    norm = functools.partial(nn.BatchNorm, use_running_average=not kwargs.get("train", False), momentum=0.9,
                             epsilon=1e-5)
    return blocks.BasicBlock(filters=4, conv=conv, norm=norm, act=nn.relu, **kwargs)


X = np.random.default_rng(1).normal(size=(2, 6, 6, 4)).astype(np.float32)


@pytest.mark.parametrize("order", blocks.ACTIVATION_ORDERS)
def test_activation_orders_match_numpy_reference(order):
    block = _block(unit=blocks.Unit(order=order))
    variables = _random_variables(block.init(jax.random.PRNGKey(0), X))
    ours = np.asarray(block.apply(variables, X))
    ref = _np_unit(order, X.astype(np.float64), jax.tree.map(np.asarray, variables["params"]),
                   jax.tree.map(np.asarray, variables["batch_stats"]))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_activation_orders_keep_the_parameter_count():
    counts = {order: param_count(models.create("resnet20", activation_order=order), 32)
              for order in blocks.ACTIVATION_ORDERS}
    assert set(counts.values()) == {269_722}, counts


def test_orders_refused_where_meaningless():
    with pytest.raises(ValueError, match="bn_after_add the branch ends in a convolution"):
        models.create("resnet20", activation_order="bn_after_add", zero_init_residual=True)
    with pytest.raises(ValueError, match="unknown activation_order"):
        models.create("resnet20", activation_order="preact")


# ---------------------------------------------------------------------------------------
# Shortcut variants (Table 1), on the original unit.


def _init_apply(model, x, variables=None, train=False, rngs=None):
    variables = variables or model.init(jax.random.PRNGKey(0), x, train=False)
    if train:
        out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        return variables, np.asarray(out)
    return variables, np.asarray(model.apply(variables, x, train=False))


IMAGES = np.random.default_rng(2).normal(size=(4, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("scale_on", blocks.SCALE_ON)
def test_constant_scaling_by_one_is_the_original_bitwise(scale_on):
    original = models.create("resnet8")
    variables, expected = _init_apply(original, IMAGES)
    _, scaled = _init_apply(original.clone(shortcut_variant="scaling", shortcut_scale=1.0, scale_on=scale_on), IMAGES,
                            variables)
    np.testing.assert_array_equal(scaled, expected)


def test_constant_scaling_both_by_half_halves_the_unit():
    """ReLU(0.5 h + 0.5 F) = 0.5 ReLU(h + F), bitwise (scaling by 2^-1 is exact)."""
    block = _block()
    variables = _random_variables(block.init(jax.random.PRNGKey(0), X))
    half = _block(unit=blocks.Unit(variant="scaling", scale=0.5, scale_on="both")).apply(variables, X)
    np.testing.assert_array_equal(np.asarray(half), 0.5 * np.asarray(block.apply(variables, X)))
    on_shortcut = _block(unit=blocks.Unit(variant="scaling", scale=0.5)).apply(variables, X)
    assert not np.array_equal(np.asarray(on_shortcut), np.asarray(half))


def _without_gates(params):
    return {k: ({kk: vv for kk, vv in v.items() if kk != "gate"} if isinstance(v, dict) else v)
            for k, v in params.items()}


def test_shortcut_gating_with_shortcut_gate_one_is_the_identity_bitwise():
    """b_g -> -inf: g = 0, 1 - g = 1, so (1 - g) h + F = h + F, the original unit."""
    original = models.create("resnet8")
    gated = original.clone(shortcut_variant="shortcut_gating", gate_bias=-1e4)
    variables = gated.init(jax.random.PRNGKey(0), IMAGES, train=False)
    _, out = _init_apply(gated, IMAGES, variables)
    plain_vars = {"params": _without_gates(variables["params"]), "batch_stats": variables["batch_stats"]}
    _, expected = _init_apply(original, IMAGES, plain_vars)
    np.testing.assert_array_equal(out, expected)
    # The paper's init (b_g = -6, 1 - g ~ 0.9975) is near, not at, the identity.
    _, near = _init_apply(gated.clone(gate_bias=-6.0), IMAGES)
    assert not np.array_equal(near, expected) and np.allclose(near, expected, rtol=0.05, atol=0.05)


def test_exclusive_gating_with_gate_one_is_the_plain_net():
    """b_g -> +inf: g = 1, so (1 - g) h + g F = F: the plain twin, bitwise."""
    gated = models.create("resnet8", shortcut_variant="exclusive_gating", gate_bias=1e4)
    variables = gated.init(jax.random.PRNGKey(0), IMAGES, train=False)
    _, out = _init_apply(gated, IMAGES, variables)
    plain = models.create("plain8")
    _, expected = _init_apply(plain, IMAGES, {"params": _without_gates(variables["params"]),
                                              "batch_stats": variables["batch_stats"]})
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("variant", ["exclusive_gating", "shortcut_gating"])
def test_gates_are_1x1_convs_with_the_papers_bias(variant):
    model = models.create("resnet8", shortcut_variant=variant)
    params = model.init(jax.random.PRNGKey(0), IMAGES, train=False)["params"]
    gate = params["stage2_block1"]["gate"]
    assert gate["kernel"].shape == (1, 1, 16, 32)
    np.testing.assert_array_equal(gate["bias"], np.full(32, -6.0, np.float32))
    # One gate of in*out + out per unit.
    assert param_count(model, 16) - param_count(models.create("resnet8"), 16) == 16 * 17 + 16 * 32 + 32 + 32 * 64 + 64


def test_conv1x1_shortcut_in_every_unit():
    extra = param_count(models.create("resnet8", shortcut_variant="conv1x1"), 16) - param_count(
        models.create("resnet8"), 16)
    assert extra == 16 * 16 + 16 * 32 + 32 * 64  # no BN, no bias: Fig. 2(e)
    with pytest.raises(ValueError, match="conv1x1 puts a 1x1 conv on every shortcut"):
        models.create("resnet8", shortcut_variant="conv1x1", shortcut="B")


def test_dropout_shortcut():
    original = models.create("resnet8")
    variables, expected = _init_apply(original, IMAGES, train=True)
    rngs = {"dropout": jax.random.PRNGKey(5)}
    _, zero = _init_apply(original.clone(shortcut_variant="dropout", shortcut_dropout=0.0), IMAGES, variables,
                          train=True, rngs=rngs)
    np.testing.assert_array_equal(zero, expected)
    _, half = _init_apply(original.clone(shortcut_variant="dropout", shortcut_dropout=0.5), IMAGES, variables,
                          train=True, rngs=rngs)
    assert not np.allclose(half, expected)
    _, evaluated = _init_apply(original.clone(shortcut_variant="dropout", shortcut_dropout=0.5), IMAGES, variables)
    np.testing.assert_array_equal(evaluated, _init_apply(original, IMAGES, variables)[1])


@pytest.mark.parametrize("overrides,message", [
    ({"shortcut_variant": "scaling", "activation_order": "full_preact"}, "ablation of the original unit"),
    ({"shortcut_variant": "dropout", "skip": False}, "a plain net has no shortcut"),
    ({"shortcut_variant": "gating"}, "unknown shortcut_variant"),
    ({"stochastic_depth": 0.5, "skip": False}, "a plain net has none"),
    ({"stochastic_depth": 1.0}, "must be in [0, 1)"),
    ({"stochastic_depth": 0.5, "stochastic_depth_mode": "layer"}, "unknown stochastic_depth_mode"),
])
def test_meaningless_unit_options_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        models.create("resnet8", **overrides)


# ---------------------------------------------------------------------------------------
# Stochastic depth (Huang et al.).


def test_survival_probabilities_decay_linearly():
    model = models.create("resnet110", stochastic_depth=0.5)
    p = model.survival_probabilities()
    assert len(p) == 54 and p[-1] == 0.5 and p[0] == pytest.approx(1 - 0.5 / 54)
    np.testing.assert_allclose(np.diff(p), -0.5 / 54)
    assert models.create("resnet110").survival_probabilities() == [1.0] * 54


@pytest.mark.parametrize("mode", blocks.DEPTH_MODES)
def test_survival_one_is_the_normal_forward_bitwise(mode):
    """Compiled, as training runs it (op by op, XLA's fusion inside lax.cond may differ in
    the last bit): the output and the updated BN statistics."""
    block = _block(train=True)
    variables = block.init(jax.random.PRNGKey(0), X)
    variables = {"params": _random_variables(variables)["params"], "batch_stats": variables["batch_stats"]}
    rngs = {"dropout": jax.random.PRNGKey(1), "depth": jax.random.PRNGKey(2)}
    expected = jax.jit(lambda v: block.apply(v, X, mutable=["batch_stats"]))(variables)
    always = _block(train=True, unit=blocks.Unit(survival=1.0, depth_mode=mode))
    out = jax.jit(lambda v: always.apply(v, X, mutable=["batch_stats"], rngs=rngs))(variables)
    assert jax.tree.all(jax.tree.map(np.array_equal, out, expected))


def test_whole_net_with_survival_near_one_is_the_normal_training_forward_bitwise(mode="batch"):
    """p_l = 1 - 1e-7 l/L keeps every block for this key: bitwise the net without it (the
    batch mode does not rescale in training; drop path's 1/p_l would change the bits)."""
    model = models.create("resnet8")
    variables = model.init(jax.random.PRNGKey(0), IMAGES, train=False)
    rngs = {"dropout": jax.random.PRNGKey(1), "depth": jax.random.PRNGKey(2)}
    run = lambda m: jax.jit(lambda v: m.apply(v, IMAGES, train=True, mutable=["batch_stats"], rngs=rngs))(variables)
    assert jax.tree.all(jax.tree.map(np.array_equal, run(model.clone(stochastic_depth=1e-7,
                                                                       stochastic_depth_mode=mode)), run(model)))


def _kept_blocks(model, variables, key, images=IMAGES):
    """Which blocks computed F in one training step: a dropped F is not computed at all (as
    in the authors' Torch code), so its BN statistics stay as they were."""
    _, state = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"depth": key, "dropout": key})
    # (A deleted block's branch is not even created: no statistics of it come back.)
    return jnp.stack([name in state["batch_stats"] and ~jnp.array_equal(
        state["batch_stats"][name]["bn1"]["mean"], variables["batch_stats"][name]["bn1"]["mean"])
        for name in model.block_names()])


def test_empirical_survival_matches_probability():
    model = models.create("resnet8", stochastic_depth=0.6)
    p = np.array(model.survival_probabilities())  # 0.8, 0.6, 0.4
    variables = model.init(jax.random.PRNGKey(0), IMAGES, train=False)
    trials = 400
    keys = jax.random.split(jax.random.PRNGKey(3), trials)
    kept = np.asarray(jax.jit(jax.vmap(lambda k: _kept_blocks(model, variables, k)))(keys))
    frequency = kept.mean(axis=0)
    bound = 4 * np.sqrt(p * (1 - p) / trials)  # 4 sigma of a binomial frequency
    assert np.all(np.abs(frequency - p) < bound), (frequency, p)
    # The blocks draw independently (not one coin for all).
    assert 0 < np.mean(kept[:, 0] != kept[:, 2])
    # Evaluation never drops.
    _, state = model.apply(variables, IMAGES, train=False, mutable=["intermediates"])


def _linear_toy(mode, train):
    """Two identity-activation units with affine (running-average) BN: the net is affine in
    each block's keep decision, so E[train output] = eval output exactly."""
    conv = functools.partial(nn.Conv, use_bias=False, padding=1)
    norm = functools.partial(nn.BatchNorm, use_running_average=True)

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, p in enumerate((0.7, 0.4)):
                x = blocks.BasicBlock(filters=4, conv=conv, norm=norm, act=lambda v: v, train=train,
                                      unit=blocks.Unit(survival=p, depth_mode=mode), name=f"b{i}")(x)
            return x

    return Toy()


@pytest.mark.parametrize("mode", blocks.DEPTH_MODES)
def test_eval_output_is_the_expectation_on_a_linear_toy(mode):
    variables = _random_variables(_linear_toy(mode, False).init(jax.random.PRNGKey(0), X))
    expected = np.asarray(_linear_toy(mode, False).apply(variables, X))
    train = _linear_toy(mode, True)
    trials = 4000
    keys = jax.random.split(jax.random.PRNGKey(4), trials)
    outs = jax.jit(jax.vmap(lambda k: train.apply(variables, X, rngs={"depth": k, "dropout": k})))(keys)
    outs = np.asarray(outs, np.float64)
    mean, spread = outs.mean(axis=0), outs.std(axis=0)
    assert np.all(np.abs(mean - expected) <= 5 * spread / np.sqrt(trials) + 1e-5)
    # And the training outputs really vary (a block is dropped sometimes).
    assert np.mean(spread) > 0.1 * np.mean(np.abs(expected))


def test_batch_mode_drops_for_the_whole_batch_example_mode_per_example():
    model = models.create("resnet8", stochastic_depth=0.6)
    variables = model.init(jax.random.PRNGKey(0), IMAGES, train=False)
    per_batch = np.asarray(jax.jit(jax.vmap(lambda k: _kept_blocks(model, variables, k)))(
        jax.random.split(jax.random.PRNGKey(6), 40)))
    assert per_batch.any() and not per_batch.all()
    # Example mode: some examples of one batch keep a block that others drop.
    example = model.clone(stochastic_depth_mode="example")
    # Jitted once for the 8 seeds (op by op, each forward costs seconds).
    forward = jax.jit(lambda key: example.apply(variables, IMAGES, train=True, mutable=["batch_stats", "intermediates"],
                                                rngs={"dropout": key})[1])
    differs = []
    for seed in range(8):
        state = forward(jax.random.PRNGKey(seed))
        inter = {k: v[0] for k, v in state["intermediates"].items()}
        h = nn.relu(blocks.shortcut(inter["stage2"], 64, 2, "A", None, None))
        same = np.all(np.asarray(h == inter["stage3"]).reshape(len(IMAGES), -1), axis=1)
        differs.append(same.any() and not same.all())
    assert any(differs)


def test_stochastic_depth_composes_with_drop_blocks():
    """A deleted block stays deleted whatever the draw; the others still draw."""
    model = models.create("resnet8", stochastic_depth=0.6, drop_blocks=(1,))
    variables = model.init(jax.random.PRNGKey(0), IMAGES, train=False)
    kept = np.asarray(jax.vmap(lambda k: _kept_blocks(model, variables, k))(jax.random.split(jax.random.PRNGKey(7), 40)))
    assert not kept[:, 1].any() and kept[:, 0].any() and kept[:, 2].any()


# ---------------------------------------------------------------------------------------
# Stochastic depth in the trainer: its draws are a function of (seed, step).


def test_resume_across_dropped_blocks_is_bitwise(tmp_path, capsys):
    """20 steps straight vs its checkpoint 10 resumed to 20 (as after a `kill -9`), with
    blocks dropped in the resumed part; and the drops really happen in training (a step
    differs from the same step without them). In this process: resnet_jax.main only parses
    flags and calls train_and_evaluate."""
    import shutil

    from resnet_jax import train
    from resnet_jax.data import pipeline
    from tests.helpers import restore_state, tiny_config, tree_equal
    from tests.one_step_probe import probe

    common = {"optim.schedule": "constant", "train.checkpoint_every": 5, "model.stochastic_depth": 0.5}
    # Which blocks the trainer drops at steps 10..19 (the draw depends on the key and the
    # block, not on the weights): some must be, or the resume crosses none.
    model = models.create("resnet8", stochastic_depth=0.5)
    images = IMAGES
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    # One jitted, vmapped forward for all 11 steps' keys: op by op they cost ~20x more.
    steps = [0, *range(10, 20)]
    keys = jnp.stack([jax.random.fold_in(pipeline.step_keys(0, jnp.int32(step))[1], train.DEPTH_STREAM)
                      for step in steps])
    dropped = ~np.asarray(jax.jit(jax.vmap(lambda key: _kept_blocks(model, variables, key, images)))(keys))
    assert np.any(dropped[1:]) and np.any(dropped[0])

    config = tiny_config(**common)
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for step in ("15", "20"):  # the run died after writing checkpoint 10
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
    capsys.readouterr()
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert "resuming at step 10" in capsys.readouterr().out
    straight, _ = restore_state(tmp_path / "straight")
    resumed, step = restore_state(tmp_path / "resumed")
    assert step == 20 and tree_equal(straight, resumed)
    # Step 0 drops blocks too: its update is not the one without them.
    with_drops, without = probe(common), probe({**common, "model.stochastic_depth": 0.0})
    assert not tree_equal([with_drops[k] for k in sorted(with_drops) if k.startswith("after")],
                          [without[k] for k in sorted(without) if k.startswith("after")])


@pytest.mark.parametrize("name,block,last_conv", [("preresnet14", 1, "conv2"), ("preresnet14", 3, "conv2"),
                                                  ("resnet14", 1, "conv2")])
def test_deleted_block_is_the_unit_with_f_taken_out(name, block, last_conv):
    """drop_blocks (the lesion) on any ordering: the unit with F = 0, i.e. the net whose
    block has its last convolution zeroed (for pre-activation: F's last layer is a conv)."""
    model = models.create(name, zero_init_residual=False)
    if not name.startswith("pre"):
        model, last_conv = model.clone(activation_order="relu_before_add"), "conv2"
    variables = model.init(jax.random.PRNGKey(0), IMAGES, train=False)
    block_name = model.block_names()[block]
    params = jax.tree.map(lambda x: x, variables["params"])
    params[block_name] = dict(params[block_name])
    params[block_name][last_conv] = {"kernel": jnp.zeros_like(params[block_name][last_conv]["kernel"])}
    zeroed = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, IMAGES, train=False)
    deleted = model.clone(drop_blocks=(block,)).apply(variables, IMAGES, train=False)
    full = model.apply(variables, IMAGES, train=False)
    np.testing.assert_allclose(deleted, zeroed, rtol=1e-5, atol=1e-6)
    assert not np.allclose(deleted, full, atol=1e-4)
