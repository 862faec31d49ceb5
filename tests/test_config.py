"""resnet_jax.config in-process: every validation rule refuses what it should with
the message a user reads, and accepts the recipes; lengths in steps or epochs. Fast (no
training), so the mutation run (scripts/mutation.sh) can use them."""

import pytest

from configs import cifar, digits, imagenet
from helpers import override
from resnet_jax import config as config_lib
from resnet_jax.errors import UserError


GE = "train.eval_every, train.total_epochs, optim.warmup_steps, optim.warmup_epochs and data.crop_padding must be >= 0"


def _with(**overrides):
    return override(digits.get_config(), overrides)


@pytest.mark.parametrize("config", [cifar.get_config("resnet56"), cifar.get_config("plain20"),
                                    cifar.get_config("resnet110"), imagenet.get_config("resnet50"), digits.get_config(),
                                    config_lib.default_config()], ids=["r56", "p20", "r110", "r50", "digits", "default"])
def test_recipes_validate(config):
    config_lib.validate(config, 1)
    config_lib.validate(config, 4)  # every recipe's batches divide over 4 devices


@pytest.mark.parametrize("overrides,devices,message", [
    ({"model.name": "resnet57"}, 1, "unknown model 'resnet57'"),
    ({"model.shortcut": "D"}, 1, "unknown shortcut 'D'; choose from A, B, C"),
    ({"model.name": "plain20", "model.zero_init_residual": True}, 1, "zero_init_residual needs skip connections"),
    ({"model.name": "resnet18"}, 1, "unknown model 'resnet18'"),  # digits sets model.family=cifar
    ({"model.name": "resnet50", "model.family": "", "model.bottleneck_stride": "v3"}, 1,
     "unknown bottleneck_stride 'v3'; choose from v1, v1.5"),
    ({"model.dtype": "float16"}, 1, "unknown model.dtype 'float16'; choose from float32, bfloat16"),
    ({"data.source": "csv"}, 1, "unknown data.source 'csv'; choose from tfds, npz, digits, synthetic"),
    ({"data.pipeline": "disk"}, 1, "unknown data.pipeline 'disk'; choose from device, stream"),
    ({"data.normalization": "zca"}, 1, "unknown data.normalization 'zca'"),
    ({"optim.name": "rmsprop"}, 1, "unknown optim.name 'rmsprop'; choose from sgd, adam, lars, lamb"),
    ({"optim.name": "lamb", "optim.nesterov": True}, 1, "optim.nesterov=True is only read by optim.name=sgd|lars, not lamb"),
    ({"optim.name": "lamb", "optim.trust_coefficient": 0.02}, 1,
     "optim.trust_coefficient=0.02 is only read by optim.name=lars, not lamb"),
    ({"optim.name": "lars", "optim.trust_coefficient": 0.0}, 1, "optim.trust_coefficient must be positive, got 0.0"),
    ({"train.ema_decay": 1.0}, 1, "train.ema_decay must be in [0, 1) (0 = no weight EMA; e.g. 0.9999), got 1.0"),
    ({"train.ema_decay": -0.5}, 1, "train.ema_decay must be in [0, 1)"),
    ({"train.ema_warmup": True}, 1, "train.ema_warmup=True needs train.ema_decay > 0"),
    ({"train.ema_decay": 0.99, "train.ema_warmup_power": 0.75}, 1,
     "train.ema_warmup_power=0.75 is only read with train.ema_warmup=True"),
    ({"train.ema_decay": 0.99, "train.ema_warmup": True, "train.ema_warmup_gamma": 0.0}, 1,
     "train.ema_warmup_gamma must be positive, got 0.0"),
    ({"optim.schedule": "exponential"}, 1, "unknown optim.schedule 'exponential'"),
    ({"optim.warmup": "cubic"}, 1, "unknown optim.warmup 'cubic'; choose from linear, constant"),
    ({"optim.boundaries_unit": "hours"}, 1, "unknown optim.boundaries_unit 'hours'"),
    ({"parallel.backend": "xmap"}, 1, "unknown parallel.backend 'xmap'; choose from shard_map, pmap"),
    ({"train.batch_size": 0}, 1, "train.batch_size must be positive, got 0"),
    ({"train.eval_batch_size": -1}, 1, "train.eval_batch_size must be positive, got -1"),
    ({"train.log_every": 0}, 1, "train.log_every must be positive"),
    ({"train.checkpoint_every": 0}, 1, "train.checkpoint_every must be positive"),
    ({"train.keep_checkpoints": 0}, 1, "train.keep_checkpoints must be positive"),
    ({"train.steps_per_dispatch": -1}, 1, "train.steps_per_dispatch must be >= 0 (0 = auto), got -1"),
    ({"data.num_classes": 0}, 1, "data.num_classes must be positive"),
    ({"data.image_size": 0}, 1, "data.image_size must be positive"),
    ({"optim.lr": 0.0}, 1, "optim.lr must be positive, got 0.0"),
    ({"model.dropout_rate": 1.0}, 1, "model.dropout_rate must be in [0, 1), got 1.0"),
    ({"model.shortcut_scale": 0.25}, 1, "model.shortcut_scale=0.25 is only read by model.shortcut_variant=scaling"),
    ({"model.gate_bias": -5.0, "model.shortcut_variant": "conv1x1"}, 1,
     "model.gate_bias=-5.0 is only read by model.shortcut_variant=exclusive_gating|shortcut_gating, not conv1x1"),
    ({"model.shortcut_dropout": 0.1}, 1, "model.shortcut_dropout=0.1 is only read by model.shortcut_variant=dropout"),
    ({"model.stochastic_depth_mode": "example"}, 1, "model.stochastic_depth_mode=example needs model.stochastic_depth > 0"),
    ({"model.stochastic_depth": 0.5, "model.name": "plain20"}, 1, "stochastic_depth drops residual branches"),
    ({"model.activation_order": "full"}, 1, "unknown activation_order 'full'; choose from original"),
    ({"model.shortcut_variant": "scaling", "model.name": "preresnet20"}, 1, "shortcut_variant=scaling is an ablation of the original unit"),
    ({"model.dropout_rate": -0.1}, 1, "model.dropout_rate must be in [0, 1)"),
    ({"train.eval_every": -1}, 1, GE),
    ({"optim.warmup_steps": -1}, 1, GE),
    ({"data.crop_padding": -1}, 1, GE),
    ({"train.total_epochs": -1.0}, 1, GE),
    ({"optim.warmup_epochs": -0.5}, 1, GE),
    ({"train.batch_size": 66}, 4, "train.batch_size=66 does not divide over 4 devices; use a multiple of 4"),
    ({"train.eval_batch_size": 362}, 4, "train.eval_batch_size=362 does not divide over 4 devices"),
    ({"optim.schedule": "multistep", "optim.boundaries": (0.5, 1.0)}, 1,
     "optim.boundaries (0.5, 1.0) must be fractions in (0, 1) with optim.boundaries_unit=fraction"),
    ({"optim.schedule": "multistep", "optim.boundaries": (0.0,)}, 1, "optim.boundaries (0.0,) must be fractions in (0, 1)"),
    ({"data.source": "npz"}, 1, "data.source=npz needs data.path=FILE.npz"),
    ({"data.source": "npz", "data.path": "/nonexistent/x.npz"}, 1, "data file not found: /nonexistent/x.npz"),
    ({"data.pipeline": "stream"}, 1, "data.pipeline=stream reads TFDS datasets; use data.pipeline=device for "
                                     "data.source=digits"),
    ({"data.eval_splits": "test"}, 1, "data.eval_splits item 'test' is not name=split"),
    ({"data.eval_splits": "=test"}, 1, "data.eval_splits item '=test' is not name=split"),
    ({"data.eval_splits": "test="}, 1, "data.eval_splits item 'test=' is not name=split"),
])
def test_validate_refuses(overrides, devices, message):
    with pytest.raises(UserError) as raised:
        config_lib.validate(_with(**overrides), devices)
    assert str(raised.value).startswith(message), str(raised.value)


def test_validate_accepts_the_edges():
    """What the rules allow, right at their edges."""
    for overrides in ({"model.dropout_rate": 0.0}, {"train.eval_every": 0}, {"optim.warmup_steps": 0},
                      {"data.crop_padding": 0}, {"optim.schedule": "multistep", "optim.boundaries": (0.25, 0.999)},
                      {"data.eval_splits": ""}, {"train.steps_per_dispatch": 0},
                      {"model.name": "resnet18", "model.family": ""}, {"data.source": "synthetic"},
                      {"optim.schedule": "cosine", "optim.boundaries": (5,)},  # boundaries only bind multistep
                      {"optim.boundaries_unit": "steps", "optim.boundaries": (5, 600)},
                      {"optim.name": "lars", "optim.nesterov": True, "optim.trust_coefficient": 0.02},
                      {"train.ema_decay": 0.9999, "train.ema_warmup": True, "train.ema_warmup_power": 0.75}):
        config_lib.validate(_with(**overrides), 1)
    config_lib.validate(_with(**{"train.batch_size": 64, "train.eval_batch_size": 360}), 4)


def test_steps_per_dispatch_auto():
    assert config_lib.steps_per_dispatch(3, "gpu") == config_lib.steps_per_dispatch(3, "cpu") == 3
    assert config_lib.steps_per_dispatch(1, "gpu") == 1  # an explicit 1 is kept
    assert config_lib.steps_per_dispatch(0, "cpu") == 1  # XLA:CPU runs scanned steps slower
    assert config_lib.steps_per_dispatch(0, "gpu") == config_lib.steps_per_dispatch(0, "tpu") == \
        config_lib.AUTO_ACCELERATOR_STEPS_PER_DISPATCH > 1


def test_parse_splits():
    assert config_lib.parse_splits(" val = train[45000:] , test=test,") == {"val": "train[45000:]", "test": "test"}
    assert config_lib.parse_splits("") == {}
    assert config_lib.parse_splits("a=train[:10%]") == {"a": "train[:10%]"}
    # "name=split?": optional, evaluated only where the data holds the split.
    spec = "test=test, exact = test_exact ?,few=test_exact[:200]?"
    assert config_lib.parse_splits(spec) == {"test": "test", "exact": "test_exact", "few": "test_exact[:200]"}
    assert config_lib.optional_splits(spec) == {"exact", "few"}
    assert config_lib.optional_splits("test=test") == set()
    with pytest.raises(UserError, match=r"data.eval_splits item 'a=\?' is not name=split"):
        config_lib.parse_splits("a=?")


def test_steps_in_steps_or_epochs():
    assert config_lib.steps(1000, 0.0, 390) == 1000
    assert config_lib.steps(0, 2.5, 390) == 975
    assert config_lib.steps(0, 0.5, 3) == 2  # rounded, not truncated (1.5 -> 2)
    assert isinstance(config_lib.steps(7.0, 0, 3), int)
    with pytest.raises(UserError, match=r"train.total_steps=1000 and train.total_epochs=2.5 are both set"):
        config_lib.steps(1000, 2.5, 390)
    with pytest.raises(UserError, match=r"train.total_steps=1 and train.total_epochs=0.5 are both set"):
        config_lib.steps(1, 0.5, 390)


@pytest.mark.parametrize("overrides,steps_per_epoch,total", [
    ({"train.total_steps": 100}, 10, 100),
    ({"train.total_steps": 0, "train.total_epochs": 3.0}, 10, 30),
    ({"optim.schedule": "multistep", "optim.boundaries_unit": "steps", "optim.boundaries": (99,),
      "train.total_steps": 100}, 10, 100),
    # Epoch boundaries past the end are allowed: a shortened ImageNet run keeps its recipe.
    ({"optim.schedule": "multistep", "optim.boundaries_unit": "epochs", "optim.boundaries": (30,),
      "train.total_steps": 100}, 10, 100),
    ({"optim.warmup_steps": 99, "train.total_steps": 100}, 10, 100),
    # Boundaries bind only the multistep schedule.
    ({"optim.schedule": "cosine", "optim.boundaries_unit": "steps", "optim.boundaries": (500,),
      "train.total_steps": 100}, 10, 100),
])
def test_validate_lengths_accepts(overrides, steps_per_epoch, total):
    assert config_lib.validate_lengths(_with(**overrides), steps_per_epoch) == total


@pytest.mark.parametrize("overrides,steps_per_epoch,message", [
    ({"optim.schedule": "multistep", "optim.boundaries_unit": "steps", "optim.boundaries": (50, 100),
      "train.total_steps": 100}, 10, "optim.boundaries (50, 100) reach past train.total_steps=100: [100]"),
    ({"optim.warmup_steps": 100, "train.total_steps": 100}, 10,
     "the warm-up (100 steps) is not shorter than training (100 steps)"),
    ({"optim.warmup_epochs": 2.0, "train.total_steps": 0, "train.total_epochs": 2.0}, 10,
     "the warm-up (20 steps) is not shorter"),
    ({"train.total_steps": 0, "train.total_epochs": 0.01}, 10,
     "the training length (train.total_steps or train.total_epochs) must be positive"),
    ({"train.total_steps": 0}, 10, "the training length (train.total_steps or train.total_epochs) must be positive"),
    ({"optim.warmup_steps": 5, "optim.warmup_epochs": 1.0}, 10, "optim.warmup_steps=5 and optim.warmup_epochs=1.0"),
])
def test_validate_lengths_refuses(overrides, steps_per_epoch, message):
    with pytest.raises(UserError) as raised:
        config_lib.validate_lengths(_with(**overrides), steps_per_epoch)
    assert message in str(raised.value)


def test_defaults_are_the_paper_recipe():
    """The defaults are He et al.'s CIFAR-10 recipe (DESIGN.md), which the recipes build on."""
    config = config_lib.default_config()
    assert (config.model.name, config.model.shortcut, config.model.dtype, config.model.bn_sync) == \
        ("resnet20", "A", "float32", True)
    assert (config.train.batch_size, config.train.total_steps, config.optim.lr, config.optim.momentum,
            config.optim.weight_decay) == (128, 64_000, 0.1, 0.9, 1e-4)
    assert (tuple(config.optim.boundaries), config.optim.decay_factor, config.optim.schedule) == \
        ((0.5, 0.75), 0.1, "multistep")
    assert (config.data.crop_padding, config.data.flip, config.data.normalization) == (4, True, "per_pixel_mean")
    assert config.overwrite is False and config.parallel.backend == "shard_map"


# Every default, as users get it when they override nothing (and as config.json records it).
# A change here is a change of behaviour for every recipe that does not set the field: make
# it deliberately, and update this table with it.
DEFAULTS = {
    "data": {"crop_padding": 4, "data_dir": "", "eval_image_size": 0, "eval_resize": 256, "eval_splits": "test=test", "flip": True,
             "float_image_max": 0.0, "image_size": 32, "jpeg_draft": True, "name": "cifar10", "normalization": "per_pixel_mean",
             "num_classes": 10, "path": "", "pipeline": "device", "resize_antialias": True, "shuffle_buffer": 0,
             "source": "tfds", "synthetic_examples": 2048, "train_split": "train", "workers": 0,
             "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "mix_switch_prob": 0.5},
    "model": {"activation_order": "", "bn_sync": True, "bottleneck_stride": "v1.5", "dropout_rate": 0.0,
              "dtype": "float32", "family": "", "gate_bias": -6.0, "name": "resnet20", "scale_on": "shortcut",
              "se_ratio": 0.0, "shortcut": "A", "shortcut_downsample": "", "shortcut_dropout": 0.5,
              "shortcut_scale": 0.5, "shortcut_variant": "identity", "stem": "", "stochastic_depth": 0.0,
              "stochastic_depth_mode": "batch", "zero_init_residual": False},
    "optim": {"boundaries": (0.5, 0.75), "boundaries_unit": "fraction", "cycle_steps": 2000, "decay_bn_and_bias": True,
              "decay_factor": 0.1, "lr": 0.1, "min_lr": 0.0, "momentum": 0.9, "name": "sgd", "nesterov": False,
              "schedule": "multistep", "step_every_epochs": 30, "warmup": "linear", "warmup_epochs": 0.0,
              "warmup_lr": 0.0, "warmup_steps": 0, "weight_decay": 1e-4, "trust_coefficient": 0.001,
              "label_smoothing": 0.0},
    "overwrite": False,
    "parallel": {"backend": "shard_map"},
    "train": {"batch_size": 128, "checkpoint_every": 1000, "early_stopping_patience": 0, "early_stopping_split": "",
              "eval_batch_size": 1000, "eval_every": 0, "init_from": "", "keep_checkpoints": 3, "log_every": 100,
              "progress": True, "seed": 0, "steps_per_dispatch": 0, "total_epochs": 0.0, "total_steps": 64000,
              "ema_decay": 0.0, "ema_warmup": False, "ema_warmup_gamma": 1.0, "ema_warmup_power": 2 / 3,
              "loss": "softmax", "bce_target_threshold": 0.0},
}


def test_every_default():
    actual = config_lib.default_config().to_dict()
    assert actual == DEFAULTS

    def types(tree):
        return {k: types(v) if isinstance(v, dict) else type(v) for k, v in tree.items()}

    assert types(actual) == types(DEFAULTS)
