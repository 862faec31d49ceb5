"""ResNet-D (He et al. 2019, "Bag of Tricks": the deep stem and average-pooled projections) and
squeeze-excitation (Hu et al. 2018), as timm's resnet*d and seresnet*.

Independent sources: timm's module definitions, read from its timm/models/resnet.py
(`ResNet.__init__`'s stem, `make_blocks`, `downsample_conv` / `downsample_avg`, `BasicBlock` /
`Bottleneck`) and timm/layers/squeeze_excite.py (`SEModule`, `make_divisible`), written out
below as the state dict's keys and shapes (`timm_state_shapes`: torch and timm are not
dependencies); the parameter counts it gives, which round to the figures timm publishes
(results/results-imagenet.csv and results/benchmark-infer-*.csv, column param_count, in
millions); NumPy references of the deep stem, the pooled shortcut and the SE module.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import imagenet
from resnet_jax import config as config_lib
from resnet_jax import convert, models
from resnet_jax.errors import UserError
from resnet_jax.models import blocks
from resnet_jax.models.resnet import IMAGENET_STAGES, ResNet

# sum(p.numel() for p in timm.create_model(name).parameters()), as `timm_param_count` derives
# it from timm's definitions (by hand: resnet50d = torchvision's resnet50 25,557,032 + 19,232 for
# the deep stem; seresnet50 = 25,557,032 + 2,530,992 for 16 SE modules), and timm's published
# param_count in millions, which it rounds to.
TIMM_COUNTS = {
    "resnet18d": (11_708_744, 11.71),
    "resnet34d": (21_816_904, 21.82),
    "resnet50d": (25_576_264, 25.58),
    "resnet101d": (44_568_392, 44.57),
    "resnet152d": (60_212_040, 60.21),
    "resnet200d": (64_693_064, 64.69),
    "seresnet18": (11_779_624, 11.78),
    "seresnet34": (21_960_416, 21.96),
    "seresnet50": (28_088_024, 28.09),
    "seresnet101": (49_326_872, 49.33),
    "seresnet152": (66_821_848, 66.82),
}
# The 1x1 projections (+ BN) a ResNet-50's plain twin lacks: 64->256, 256->512, 512->1024, 1024->2048.
R50_PROJECTIONS = sum(c_in * c_out + 2 * c_out for c_in, c_out in ((64, 256), (256, 512), (512, 1024), (1024, 2048)))


def timm_make_divisible(v, divisor=8, min_value=None, round_limit=.9):
    """timm/layers/helpers.py, verbatim."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def timm_state_shapes(depth: int, deep: bool = False, avg_down: bool = False, se: bool = False,
                      projections: bool = True, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torch key -> shape of timm's `ResNet(...).state_dict()` (num_batches_tracked left out).

    deep: stem_type="deep", stem_width=32; avg_down: downsample_avg (AvgPool, conv, BN) instead
    of downsample_conv (conv, BN); se: block_args=dict(attn_layer="se"); projections=False: no
    downsample modules at all (the plain twin, which timm does not have).
    """
    bottleneck = depth >= 50
    layers = IMAGENET_STAGES[depth][1]
    out = {}

    def conv(key, c_in, c_out, k, bias=False):
        out[f"{key}.weight"] = (c_out, c_in, k, k)
        if bias:
            out[f"{key}.bias"] = (c_out,)

    def bn(key, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            out[f"{key}.{leaf}"] = (c,)

    stem_width = 32 if deep else 64
    inplanes = stem_width * 2 if deep else 64
    if deep:  # nn.Sequential(conv, norm, act, conv, norm, act, conv)
        conv("conv1.0", 3, stem_width, 3)
        bn("conv1.1", stem_width)
        conv("conv1.3", stem_width, stem_width, 3)
        bn("conv1.4", stem_width)
        conv("conv1.6", stem_width, inplanes, 3)
    else:
        conv("conv1", 3, inplanes, 7)
    bn("bn1", inplanes)
    expansion = 4 if bottleneck else 1
    for stage, (num_blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        stride = 1 if stage == 0 else 2
        outplanes = planes * expansion
        for block in range(num_blocks):
            key = f"layer{stage + 1}.{block}"
            if bottleneck:
                conv(f"{key}.conv1", inplanes, planes, 1)
                bn(f"{key}.bn1", planes)
                conv(f"{key}.conv2", planes, planes, 3)
                bn(f"{key}.bn2", planes)
                conv(f"{key}.conv3", planes, outplanes, 1)
                bn(f"{key}.bn3", outplanes)
            else:
                conv(f"{key}.conv1", inplanes, planes, 3)
                bn(f"{key}.bn1", planes)
                conv(f"{key}.conv2", planes, outplanes, 3)
                bn(f"{key}.bn2", outplanes)
            if se:  # SEModule(outplanes): rd_ratio 1/16, rd_divisor 8, round_limit 0
                rd = timm_make_divisible(outplanes * (1. / 16), 8, round_limit=0.)
                conv(f"{key}.se.fc1", outplanes, rd, 1, bias=True)
                conv(f"{key}.se.fc2", rd, outplanes, 1, bias=True)
            if projections and block == 0 and (stride != 1 or inplanes != outplanes):
                first = 1 if avg_down else 0
                conv(f"{key}.downsample.{first}", inplanes, outplanes, 1)
                bn(f"{key}.downsample.{first + 1}", outplanes)
            inplanes = outplanes
    out["fc.weight"] = (num_classes, inplanes)
    out["fc.bias"] = (num_classes,)
    return out


def timm_param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))


def timm_spec(name: str) -> dict:
    """timm_state_shapes' arguments for one of timm's names (timm/models/resnet.py's model defs)."""
    se, deep = name.startswith("se"), name.endswith("d")
    depth = int(name.removeprefix("se").removeprefix("resnet").removeprefix("plain").removesuffix("d"))
    return dict(depth=depth, deep=deep, avg_down=deep and "resnet" in name, se=se, projections="resnet" in name)


@functools.lru_cache(maxsize=None)
def abstract_variables(name: str, num_classes: int = 1000) -> dict:
    """{"params", "batch_stats"} of `create(name)` as shapes (traced, not run)."""
    model = models.create(name, num_classes=num_classes)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------
# Parameter counts and timm's names.


@pytest.mark.parametrize("name", sorted(TIMM_COUNTS))
def test_param_counts_and_names_match_timm(name):
    exact, published_millions = TIMM_COUNTS[name]
    timm_shapes = timm_state_shapes(**timm_spec(name))
    assert timm_param_count(timm_shapes) == exact and round(exact / 1e6, 2) == published_millions
    variables = abstract_variables(name)
    assert count(variables["params"]) == exact
    # Every variable under timm's key with timm's shape, so timm's weights import as they are.
    ours = {key: convert.torch_shape(shape) for key, (_, _, shape) in convert.layout(variables, "torchvision").items()}
    assert ours == timm_shapes


@pytest.mark.parametrize("plain,residual", [("plain50d", "resnet50d"), ("seplain50", "seresnet50")])
def test_plain_twins_lack_only_the_projections(plain, residual):
    """The plain twin keeps the deep stem and every SE; it loses the four projections."""
    got = count(abstract_variables(plain)["params"])
    assert got == timm_param_count(timm_state_shapes(**timm_spec(plain)))
    assert got == TIMM_COUNTS[residual][0] - R50_PROJECTIONS
    assert R50_PROJECTIONS == 2_776_576


def test_seresnet50d_is_both():
    """timm's seresnet152d recipe on a ResNet-50: the SE count and the deep stem add up."""
    got = count(abstract_variables("seresnet50d")["params"])
    se = TIMM_COUNTS["seresnet50"][0] - 25_557_032  # over torchvision's resnet50
    stem = TIMM_COUNTS["resnet50d"][0] - 25_557_032
    assert got == 25_557_032 + se + stem == timm_param_count(timm_state_shapes(50, deep=True, avg_down=True, se=True))


@pytest.mark.parametrize("channels,ratio,expected", [(256, 1 / 16, 16), (2048, 1 / 16, 128), (64, 1 / 16, 8),
                                                      (16, 1 / 16, 8), (100, 1 / 16, 8), (200, 0.25, 48),
                                                      (60, 0.25, 16)])
def test_se_width_is_timms(channels, ratio, expected):
    """make_divisible(C r, 8, round_limit=0): nearest multiple of 8, at least 8, never bumped."""
    assert blocks.se_channels(channels, ratio) == expected == timm_make_divisible(channels * ratio, 8, round_limit=0.)


# ---------------------------------------------------------------------------------------
# The layers against NumPy (eval mode: BN is affine).

X = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)  # odd: padding and ceil mode matter


def random_variables(variables, seed=0):
    """Every parameter and BN statistic random (variance positive), so nothing is trivially 0/1."""
    leaves, tree = jax.tree.flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = [rng.uniform(0.5, 1.5, leaf.shape) if path[-1].key == "var" else rng.normal(0, 0.5, leaf.shape)
           for path, leaf in leaves]
    return jax.tree.unflatten(tree, [jnp.asarray(v, jnp.float32) for v in out])


def init_random(model, x, **kwargs):
    """`random_variables` of the model's shapes: traced, never initialised (cheap on a CPU)."""
    return random_variables(jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kwargs)))


def apply_eval(model, variables, x):
    return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))


def np_conv(x, kernel, stride=1, pad=1):
    """NHWC x, HWIO kernel, zero padding `pad` on every side (torch's Conv2d)."""
    k = kernel.shape[0]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    return sum(np.einsum("nhwc,ck->nhwk", x[:, dy:dy + stride * h:stride, dx:dx + stride * w:stride], kernel[dy, dx])
               for dy in range(k) for dx in range(k))


def np_bn(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def np_max_pool_3x3_s2(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.max([x[:, dy:dy + 2 * h:2, dx:dx + 2 * w:2] for dy in range(3) for dx in range(3)], axis=0)


def test_deep_stem_is_three_3x3_convs_then_the_max_pool():
    """conv3x3/2 (8) BN ReLU, conv3x3 (8) BN ReLU, conv3x3 (16) BN ReLU, max-pool 3x3/2: 9 px -> 5 -> 3."""
    model = ResNet(stage_sizes=(1,), block_cls=blocks.BasicBlock, num_classes=3, widths=(16,), stem_width=16,
                   deep_stem=True)
    variables = init_random(model, X, train=False)
    p, s = jax.tree.map(np.asarray, variables["params"]), jax.tree.map(np.asarray, variables["batch_stats"])
    assert "stem_conv" not in p and [p[f"stem_conv{i}"]["kernel"].shape for i in (1, 2, 3)] == [
        (3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 16)]
    relu = lambda v: np.maximum(v, 0)
    y = relu(np_bn(np_conv(X.astype(np.float64), p["stem_conv1"]["kernel"], stride=2), p["stem_bn1"], s["stem_bn1"]))
    y = relu(np_bn(np_conv(y, p["stem_conv2"]["kernel"]), p["stem_bn2"], s["stem_bn2"]))
    y = np_max_pool_3x3_s2(relu(np_bn(np_conv(y, p["stem_conv3"]["kernel"]), p["stem_bn"], s["stem_bn"])))
    _, state = jax.jit(lambda v: model.apply(v, X, train=False, mutable=["intermediates"]))(variables)
    stem = np.asarray(state["intermediates"]["stem"][0])
    assert stem.shape == y.shape == (2, 3, 3, 16)
    np.testing.assert_allclose(stem, y, rtol=1e-4, atol=1e-4)


class Shortcut(nn.Module):
    """`blocks.shortcut` alone, as a block calls it (eval-mode BN)."""

    option: str = "B"
    downsample: str = "avgpool"
    strides: int = 2
    out_channels: int = 6

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)
        return blocks.shortcut(x, self.out_channels, self.strides, self.option, conv, norm, self.downsample)


def test_pooled_shortcut_is_the_2x2_mean_then_the_1x1_projection():
    """AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): on 5 px, windows {0,1}, {2,3}
    and {4}; the corner output is the corner pixel itself (a mean over 1, not a quarter)."""
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 4)).astype(np.float32)
    module = Shortcut()
    variables = init_random(module, x)
    p, s = variables["params"], variables["batch_stats"]
    assert set(p) == {"pooled_proj_conv", "pooled_proj_bn"}
    kernel = np.asarray(p["pooled_proj_conv"]["kernel"])[0, 0]
    pooled = np.zeros((2, 3, 3, 4))
    for i, rows in enumerate(([0, 1], [2, 3], [4])):
        for j, cols in enumerate(([0, 1], [2, 3], [4])):
            pooled[:, i, j] = x[:, rows][:, :, cols].mean(axis=(1, 2))
    np.testing.assert_array_equal(pooled[:, 2, 2], x[:, 4, 4])
    expected = np_bn(pooled @ kernel, jax.tree.map(np.asarray, p["pooled_proj_bn"]),
                     jax.tree.map(np.asarray, s["pooled_proj_bn"]))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)
    # The paper's strided projection reads one pixel in four: a different map, another name.
    strided = Shortcut(downsample="stride")
    renamed = {"params": {"proj_conv": p["pooled_proj_conv"], "proj_bn": p["pooled_proj_bn"]},
               "batch_stats": {"proj_bn": s["pooled_proj_bn"]}}
    np.testing.assert_allclose(jax.jit(strided.apply)(renamed, x), np_bn(
        x[:, ::2, ::2] @ kernel, jax.tree.map(np.asarray, p["pooled_proj_bn"]),
        jax.tree.map(np.asarray, s["pooled_proj_bn"])), rtol=1e-5, atol=1e-5)
    # Stride 1 (a widening bottleneck's first block): no pool, as timm's nn.Identity there.
    unstrided = Shortcut(strides=1)
    np.testing.assert_allclose(jax.jit(unstrided.apply)(variables, x), np_bn(
        x @ kernel, jax.tree.map(np.asarray, p["pooled_proj_bn"]), jax.tree.map(np.asarray, s["pooled_proj_bn"])),
        rtol=1e-5, atol=1e-5)


def test_squeeze_excite_against_numpy():
    x = np.random.default_rng(2).normal(size=(2, 3, 3, 32)).astype(np.float32)
    conv = functools.partial(nn.Conv, use_bias=False)
    module = blocks.SqueezeExcite(1 / 16, conv, nn.relu)
    variables = init_random(module, x)
    p = jax.tree.map(np.asarray, variables["params"])
    assert p["fc1"]["kernel"].shape == (1, 1, 32, 8) and p["fc2"]["bias"].shape == (32,)  # 32/16 = 2 -> 8
    squeezed = x.mean(axis=(1, 2))
    hidden = np.maximum(squeezed @ p["fc1"]["kernel"][0, 0] + p["fc1"]["bias"], 0)
    gate = 1 / (1 + np.exp(-(hidden @ p["fc2"]["kernel"][0, 0] + p["fc2"]["bias"])))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def _block(cls, se_ratio, **kwargs):
    conv = functools.partial(nn.Conv, use_bias=False, padding=1)
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)
    return cls(filters=8, conv=conv, norm=norm, act=nn.relu, strides=2, shortcut="B",
               unit=blocks.Unit(se_ratio=se_ratio, shortcut_downsample="avgpool"), **kwargs)


@pytest.mark.parametrize("cls", [blocks.BasicBlock, blocks.Bottleneck])
def test_se_with_its_gate_at_one_is_the_block_without_it(cls):
    """A bias of 1e4 on fc2 makes sigmoid exactly 1: the SE block is, bit for bit, the block
    without SE given the same weights; at its initial bias (0) it is not. At -1e4 the gate is 0
    and the block is ReLU(its shortcut): the SE sits after F's last BN, before the addition."""
    x = np.random.default_rng(3).normal(size=(2, 7, 7, 8)).astype(np.float32)
    variables = init_random(_block(cls, 1 / 16), x)
    params = jax.tree.map(lambda v: v, variables["params"])
    assert set(params["se"]) == {"fc1", "fc2"}
    without = {"params": {k: v for k, v in params.items() if k != "se"}, "batch_stats": variables["batch_stats"]}
    expected = np.asarray(jax.jit(_block(cls, 0.0).apply)(without, x))
    params["se"] = {"fc1": params["se"]["fc1"], "fc2": {"kernel": params["se"]["fc2"]["kernel"],
                                                         "bias": jnp.full_like(params["se"]["fc2"]["bias"], 1e4)}}
    with_se = jax.jit(_block(cls, 1 / 16).apply)
    gated_open = np.asarray(with_se({**variables, "params": params}, x))
    np.testing.assert_array_equal(gated_open, expected)
    assert gated_open.shape == (2, 4, 4, 8 * cls.expansion)  # ceil(7 / 2): pool and branch agree
    assert not np.allclose(np.asarray(with_se(variables, x)), expected, atol=1e-3)
    params["se"]["fc2"]["bias"] = jnp.full_like(params["se"]["fc2"]["bias"], -1e4)
    shortcut = jax.jit(Shortcut(out_channels=8 * cls.expansion).apply)(
        {"params": {k: params[k] for k in ("pooled_proj_conv", "pooled_proj_bn")},
         "batch_stats": {"pooled_proj_bn": variables["batch_stats"]["pooled_proj_bn"]}}, x)
    np.testing.assert_array_equal(with_se({**variables, "params": params}, x), jax.nn.relu(shortcut))


# ---------------------------------------------------------------------------------------
# Composition: plain twins, lesions, zero-init, pre-activation; a gradient for everything.

IMAGES = np.random.default_rng(4).normal(size=(8, 32, 32, 3)).astype(np.float32)


def tiny(block_cls=blocks.Bottleneck, **overrides) -> ResNet:
    """Every new layer in a net that compiles in seconds: deep stem, pooled projections at
    stride 1 (a widening first block) and 2, SE in every block."""
    kwargs = dict(stage_sizes=(1, 2), block_cls=block_cls, num_classes=3, widths=(4, 8), stem_width=8,
                  deep_stem=True, shortcut_downsample="avgpool", se_ratio=1 / 16)
    return ResNet(**{**kwargs, **overrides})


def test_plain_twins_keep_the_deep_stem_and_se():
    plain, residual = abstract_variables("seplain50")["params"], abstract_variables("seresnet50")["params"]
    assert set(plain) == set(residual) and "stem_conv" in plain
    assert set(abstract_variables("plain50d")["params"]) == set(abstract_variables("resnet50d")["params"])
    assert {"stem_conv1", "stem_bn1", "stem_conv2", "stem_bn2", "stem_conv3", "stem_bn"} <= set(
        abstract_variables("plain50d")["params"])
    assert set(residual["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "se", "proj_conv",
                                              "proj_bn"}
    assert set(plain["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "se"}
    assert "pooled_proj_conv" in abstract_variables("resnet50d")["params"]["stage1_block1"]
    assert models.create("plain50d").shortcut_downsample == "stride" and models.create("plain50d").deep_stem


def test_a_deleted_block_is_its_pooled_shortcut():
    """drop_blocks on ResNet-D + SE: the unit with F = 0, i.e. the net whose block has its last
    BN zeroed (SE(0) = 0), which leaves ReLU(the pooled projection). With shortcut C and the
    v1 bottleneck (stride on the first 1x1), so every block projects and the pooled shortcut
    meets the other strided branch."""
    model = tiny(shortcut="C", bottleneck_stride="v1")
    variables = init_random(model, IMAGES, train=False)
    block = "stage2_block1"  # strided: its shortcut pools
    params = jax.tree.map(lambda v: v, variables["params"])
    params[block] = {**params[block], "bn3": jax.tree.map(jnp.zeros_like, params[block]["bn3"])}
    zeroed = apply_eval(model, {**variables, "params": params}, IMAGES)
    deleted = apply_eval(model.clone(drop_blocks=(1,)), variables, IMAGES)
    np.testing.assert_allclose(deleted, zeroed, rtol=1e-5, atol=1e-6)
    assert not np.allclose(deleted, apply_eval(model, variables, IMAGES), atol=1e-4)


def test_a_zero_init_block_is_relu_of_its_pooled_shortcut():
    """zero_init_residual zeroes the BN before the SE, so F = SE(0) = 0."""
    x = np.random.default_rng(5).normal(size=(2, 7, 7, 8)).astype(np.float32)
    block = _block(blocks.BasicBlock, 1 / 16, zero_init_residual=True)
    variables = jax.jit(block.init)(jax.random.key(0), x)
    assert not np.asarray(variables["params"]["bn2"]["scale"]).any()
    p, s = variables["params"], variables["batch_stats"]
    shortcut = jax.jit(Shortcut(out_channels=8).apply)(
        {"params": {k: p[k] for k in ("pooled_proj_conv", "pooled_proj_bn")}, "batch_stats": s}, x)
    np.testing.assert_array_equal(jax.jit(block.apply)(variables, x), jax.nn.relu(shortcut))


@pytest.mark.parametrize("overrides", [
    {}, {"block_cls": blocks.BasicBlock, "skip": False, "shortcut_downsample": "stride",
         "activation_order": "full_preact"}], ids=["bottleneck", "plain-basic-preact"])
def test_every_parameter_gets_a_gradient(overrides):
    """A training step of each composition: finite, every parameter moved by the loss and
    every running statistic by the batch."""
    model = tiny(**overrides)
    variables = init_random(model, IMAGES, train=False)
    labels = jnp.arange(8) % 3

    def loss_fn(params):
        logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, IMAGES, train=True,
                                    mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state["batch_stats"]

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.isfinite(g).all()) for _, g in leaves)
    assert [jax.tree_util.keystr(p) for p, g in leaves if not bool((g != 0).any())] == []
    unchanged = [jax.tree_util.keystr(p) for (p, old), new in zip(
        jax.tree_util.tree_leaves_with_path(variables["batch_stats"]), jax.tree.leaves(stats)) if bool((old == new).all())]
    assert unchanged == []
    assert "se" in variables["params"]["stage1_block1"] and "stem_conv1" in variables["params"]


def test_weights_round_trip_under_timms_names():
    model = tiny()
    variables = init_random(model, IMAGES, train=False)
    state_dict = convert.to_state_dict(variables["params"], variables["batch_stats"], "torchvision")
    for key in ("conv1.0.weight", "conv1.1.running_var", "conv1.6.weight", "bn1.weight", "layer1.0.se.fc1.bias",
                "layer1.0.downsample.1.weight", "layer2.0.downsample.2.running_mean", "layer2.1.se.fc2.weight"):
        assert key in state_dict, key
    assert not any(".downsample.0." in key or "stem" in key for key in state_dict)
    params, stats = convert.from_state_dict(state_dict, "torchvision", variables, "x.safetensors", "tiny")
    assert jax.tree.all(jax.tree.map(np.array_equal, {"params": params, "batch_stats": stats}, variables))


# ---------------------------------------------------------------------------------------
# Config: the toggles, the presets, and what is refused.


def _config(name, recipe=imagenet, **model):
    config = recipe.get_config(name) if recipe is imagenet else recipe.get_config()
    config.model.name = name
    for key, value in model.items():
        config.model[key] = value
    return config


@pytest.mark.parametrize("name,model,expected", [
    ("resnet50d", {}, (True, "avgpool", 0.0)),
    ("seresnet50", {}, (False, "stride", 1 / 16)),
    ("resnet50d", {"stem": "standard", "shortcut_downsample": "stride"}, (False, "stride", 0.0)),
    ("resnet50", {"stem": "deep", "se_ratio": 0.25}, (True, "stride", 0.25)),
    ("seresnet50", {"se_ratio": 0.125, "shortcut_downsample": "avgpool"}, (False, "avgpool", 0.125)),
])
def test_config_fields_set_the_toggles(name, model, expected):
    from resnet_jax import steps

    config = _config(name, **model)
    config_lib.validate(config, 1)
    built = steps.build_model(config)
    assert (built.deep_stem, built.shortcut_downsample, built.se_ratio) == expected


@pytest.mark.parametrize("name,model,message", [
    ("seresnet50", {"se_ratio": -0.1}, "se_ratio (the squeeze-excitation width over the block's channels; Hu et al.: "
                                       "1/16) must be in [0, 1], got -0.1"),
    ("resnet50", {"se_ratio": 1.5}, "se_ratio (the squeeze-excitation width"),
    ("resnet50", {"stem": "tiered"}, "unknown model.stem 'tiered'; choose from standard, deep (or \"\" for the "
                                     "model name's own)"),
    ("resnet50", {"shortcut_downsample": "maxpool"}, "unknown model.shortcut_downsample 'maxpool'; choose from "
                                                     "stride, avgpool"),
    ("resnet50", {"shortcut": "A", "shortcut_downsample": "avgpool"}, "shortcut_downsample=avgpool pools before a "
                                                                      "projection's 1x1 convolution; shortcut A has none"),
    ("plain50d", {"shortcut_downsample": "avgpool"}, "shortcut_downsample=avgpool pools before a projection shortcut; "
                                                     "a plain net has no shortcut"),
    ("resnet56d", {}, "unknown model 'resnet56d'"),
    ("resnet50d", {"family": "cifar"}, "unknown model 'resnet50d'"),
])
def test_config_refuses(name, model, message):
    with pytest.raises(UserError) as raised:
        config_lib.validate(_config(name, **model), 1)
    assert str(raised.value).startswith(message), str(raised.value)


def test_cifar_nets_refuse_the_imagenet_stem_and_option_a_pooling():
    """The deep stem replaces a 7x7/2 convolution a CIFAR net does not have; its option-A
    shortcuts have no projection to pool before. SE and pooled option-B projections are fine."""
    from configs import cifar

    with pytest.raises(UserError, match="the deep stem replaces the ImageNet stem's 7x7 stride-2 convolution; a CIFAR"):
        config_lib.validate(_config("resnet20", cifar, stem="deep"), 1)
    with pytest.raises(UserError, match="shortcut A has none"):
        config_lib.validate(_config("resnet20", cifar, shortcut_downsample="avgpool"), 1)
    config_lib.validate(_config("seresnet56", cifar), 1)
    config_lib.validate(_config("resnet20", cifar, shortcut="B", shortcut_downsample="avgpool"), 1)
    assert models.model_family("seresnet56") == "cifar" and models.model_family("seplain50") == "imagenet"


def test_configs_listing_names_the_new_nets():
    """`resnet-jax configs` prints configs/imagenet.py's VARIANTS."""
    assert {"resnet18d ... resnet200d", "seresnet18 ... seresnet152"} <= set(imagenet.VARIANTS)
    assert set(TIMM_COUNTS) | {"plain50d", "seplain50"} <= set(models.available())
