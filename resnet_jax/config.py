"""The one config schema: defaults, and validation before anything is compiled or written.

Recipes in `configs/` start from `default_config()` and change what their family needs.
Every field can be overridden on the command line (`--config.train.total_steps=1000`).
"""

import os

import ml_collections

from resnet_jax import models
from resnet_jax.errors import UserError

SOURCES = ("tfds", "npz", "digits", "synthetic")
PIPELINES = ("device", "stream")
NORMALIZATIONS = ("per_pixel_mean", "per_channel", "imagenet", "none")
OPTIMIZERS = ("sgd", "adam", "lars", "lamb")
SCHEDULES = ("multistep", "step", "cosine", "linear", "triangular", "onecycle", "constant")
WARMUPS = ("linear", "constant")
BOUNDARY_UNITS = ("fraction", "steps", "epochs")
BACKENDS = ("shard_map", "pmap")
DTYPES = ("float32", "bfloat16")
LOSSES = ("softmax", "sigmoid")
# steps_per_dispatch=0 on a GPU/TPU. An assumption, not yet measured (no device has run the
# suite yet): enough scanned steps to hide a ~50 us dispatch behind ~2 ms CIFAR steps, few
# enough that logs and evaluations (at multiples of it) stay frequent. The device suite's
# bench part measures it; replace this with its best value.
AUTO_ACCELERATOR_STEPS_PER_DISPATCH = 8


def steps_per_dispatch(value: int, platform: str) -> int:
    """`train.steps_per_dispatch`, with 0 (auto) resolved for the devices' platform."""
    if value > 0:
        return value
    return 1 if platform == "cpu" else AUTO_ACCELERATOR_STEPS_PER_DISPATCH


def default_config() -> ml_collections.ConfigDict:
    """He et al.'s CIFAR-10 recipe for ResNet-20; the recipes in configs/ start here."""
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    model.name = "resnet20"
    model.family = ""  # "" = from the name; "cifar" forces CIFAR nets of depth 50/152/200
    model.shortcut = "A"  # A: zero-pad (paper, CIFAR), B: projection where shape changes, C: always
    model.zero_init_residual = False
    model.bottleneck_stride = "v1.5"  # v1: paper (stride on 1x1), v1.5: torchvision (on 3x3)
    model.dtype = "float32"  # compute dtype; parameters and BN statistics stay float32
    model.bn_sync = True  # False: each device normalises its own part (the paper's per-GPU BN)
    model.dropout_rate = 0.0
    # He et al. 2016 ("Identity Mappings"): where BN and ReLU sit; "" = the name's own
    # (original for resnet*/plain*, full_preact for preresnet*/preplain*/resnetv2_*).
    model.activation_order = ""  # original | bn_after_add | relu_before_add | relu_preact | full_preact
    # Its Table 1, on the original unit: identity (the shortcut option) | scaling |
    # exclusive_gating | shortcut_gating | conv1x1 | dropout.
    model.shortcut_variant = "identity"
    model.shortcut_scale = 0.5  # scaling: lambda (Table 1 runs 0.5)
    model.scale_on = "shortcut"  # scaling: shortcut | residual | both
    model.gate_bias = -6.0  # the gatings: b_g's initial value (Table 1's best for both)
    model.shortcut_dropout = 0.5  # dropout: the drop rate (Table 1)
    # Huang et al. 2016: 1 - p_L, the last block's drop probability (the paper: p_L = 0.5);
    # block l of L survives with p_l = 1 - l/L (1 - p_L). 0 = off.
    model.stochastic_depth = 0.0
    # batch: the paper's, and the default: one draw per block for the global batch (the same
    # on every device), so a dropped block is skipped (lax.cond): no compute, BN statistics
    # untouched, as in the authors' Torch code. example: timm's drop_path, per example.
    model.stochastic_depth_mode = "batch"

    config.data = data = ml_collections.ConfigDict()
    data.source = "tfds"  # tfds | npz | digits | synthetic
    data.name = "cifar10"  # TFDS name (tfds source); a label for the others
    data.path = ""  # the .npz file (npz source)
    data.data_dir = ""  # TFDS data_dir; "" = TFDS's default
    data.num_classes = 10
    data.image_size = 32
    data.train_split = "train"
    # name=split pairs, comma separated; TFDS slicing works for every source. A split written
    # name=split? is evaluated only where the data has it (an .npz without it skips it).
    data.eval_splits = "test=test"
    data.pipeline = "device"  # device: whole dataset on the accelerator; stream: grain workers
    data.crop_padding = 4  # zero pad + random crop back to image_size; 0 = off
    data.flip = True
    data.normalization = "per_pixel_mean"  # per_pixel_mean (paper) | per_channel | imagenet | none
    # Float images in an .npz are refused unless this says what a white pixel is (1.0 or
    # 255.0); they are then stored as uint8 like every other source.
    data.float_image_max = 0.0
    data.synthetic_examples = 2048
    data.workers = 0  # stream pipeline: grain worker processes (0 = in the main process)
    data.eval_resize = 256  # stream pipeline: shorter side before the center crop
    # stream pipeline: decode a JPEG at 1/2, 1/4 or 1/8 scale when its crop is that many times
    # the output on each side (faster; pixels differ slightly, see data/stream.py); False:
    # always a full decode.
    data.jpeg_draft = True
    data.shuffle_buffer = 0
    # Mixup / CutMix (timm's Mixup, "batch" mode: one lambda per batch, inside the train step;
    # resnet_jax/data/mix.py): Beta(alpha, alpha), 0 = off. mix_prob: the share of batches
    # mixed; mix_switch_prob: CutMix's share of those when both alphas are on.
    data.mixup_alpha = 0.0
    data.cutmix_alpha = 0.0
    data.mix_prob = 1.0
    data.mix_switch_prob = 0.5

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128  # global, over all devices
    train.eval_batch_size = 1000
    train.total_steps = 64_000
    train.total_epochs = 0.0  # the length in epochs instead (total_steps=0): the same epochs at any batch
    train.log_every = 100
    train.eval_every = 0  # 0 = once an epoch
    train.checkpoint_every = 1000
    train.keep_checkpoints = 3
    train.early_stopping_patience = 0  # in evaluations; 0 = off
    train.early_stopping_split = ""  # "" = the first eval split
    # Steps scanned inside one jitted call: fewer dispatches on an accelerator, where a CIFAR
    # step takes ~2 ms. 0 = auto: 1 on CPU (XLA:CPU runs a scanned step many times slower:
    # README, Speed), AUTO_ACCELERATOR_STEPS_PER_DISPATCH on GPU/TPU.
    train.steps_per_dispatch = 0
    train.seed = 0
    # A converted workdir or another run's workdir to start from (fine-tuning): its params and
    # BN statistics where their shapes fit this model; the rest (a new head) is initialised.
    train.init_from = ""
    train.progress = True
    # Weight EMA (Polyak averaging) of the params and BN statistics, evaluated beside the raw
    # weights (metrics.jsonl's ema_* keys) and kept in the checkpoints; 0 = off. timm's
    # ModelEmaV3: the first update copies the weights, then ema = d * ema + (1 - d) * weights.
    train.ema_decay = 0.0
    # timm's warm-up: d = min(ema_decay, 1 - (1 + n / gamma) ** -power) at the n-th update after
    # the first; gamma 1 and power 2/3 reach 0.999 at 31.6k updates (3/4: at 10k).
    train.ema_warmup = False
    train.ema_warmup_gamma = 1.0
    train.ema_warmup_power = 2 / 3
    # The training loss (resnet_jax.steps.training_loss): softmax cross-entropy, or sigmoid:
    # binary cross-entropy per class on the (smoothed, mixed) targets, as timm's "ResNet
    # strikes back". Evaluations report softmax cross-entropy either way.
    train.loss = "softmax"
    train.bce_target_threshold = 0.0  # sigmoid: targets above it -> 1, the rest -> 0 (timm's); 0 = off

    config.optim = optim = ml_collections.ConfigDict()
    # sgd | adam (after coupled L2 decay) | lars | lamb (their own decay, inside the trust ratio)
    optim.name = "sgd"
    optim.lr = 0.1
    optim.momentum = 0.9  # sgd and lars
    optim.nesterov = False  # sgd and lars
    optim.weight_decay = 1e-4  # sgd, adam: a coupled L2 term, as in the paper; lars, lamb: their own
    optim.decay_bn_and_bias = True  # False leaves BN scales/biases and biases undecayed
    optim.trust_coefficient = 0.001  # lars: eta of You et al. 2017 (optax's default)
    optim.schedule = "multistep"
    # multistep: where lr is multiplied by decay_factor, in boundaries_unit: "fraction" of
    # train.total_steps (so a shortened run keeps the recipe's shape), "steps" or "epochs".
    optim.boundaries = (0.5, 0.75)  # He et al.: 32k and 48k of 64k steps
    optim.boundaries_unit = "fraction"
    optim.decay_factor = 0.1
    optim.step_every_epochs = 30  # step schedule
    optim.min_lr = 0.0  # cosine and linear floor; lower end of the cyclical schedules
    optim.cycle_steps = 2000  # triangular: steps per full cycle
    optim.warmup_steps = 0
    optim.warmup_epochs = 0.0  # the warm-up in epochs instead (warmup_steps=0)
    optim.warmup = "linear"  # linear: warmup_lr -> lr; constant: warmup_lr throughout (ResNet-110)
    optim.warmup_lr = 0.0
    optim.label_smoothing = 0.0  # optax.smooth_labels on the targets: (1 - s) * y + s / num_classes

    config.parallel = parallel = ml_collections.ConfigDict()
    parallel.backend = "shard_map"  # shard_map | pmap

    config.overwrite = False  # True: start over in a workdir that holds another run
    return config


def _choice(value, choices, field):
    if value not in choices:
        raise UserError(f"unknown {field} {value!r}; choose from {', '.join(choices)}")


def _positive(value, field):
    if not value > 0:
        raise UserError(f"{field} must be positive, got {value}")


def parse_splits(spec: str) -> dict[str, str]:
    """"val=train[45000:],test=test,exact=test_exact?" -> {"val": "train[45000:]", "test": "test",
    "exact": "test_exact"} (a trailing "?" marks a split optional: see `optional_splits`)."""
    splits = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, split = item.partition("=")
        split = split.strip().removesuffix("?").strip()
        if not sep or not name.strip() or not split:
            raise UserError(f"data.eval_splits item {item!r} is not name=split (or name=split? where optional)")
        splits[name.strip()] = split
    return splits


def optional_splits(spec: str) -> set[str]:
    """The names in data.eval_splits written "name=split?": evaluated only where the data has
    that split (an .npz without `test_exact`, say), instead of an unknown-split error."""
    return {item.partition("=")[0].strip() for item in filter(None, (s.strip() for s in spec.split(",")))
            if item.endswith("?")}


_VARIANT_FIELDS = {"shortcut_scale": "scaling", "scale_on": "scaling", "gate_bias": "exclusive_gating|shortcut_gating",
                   "shortcut_dropout": "dropout"}


def model_options(model: ml_collections.ConfigDict) -> dict:
    """The `models.create` overrides of He et al. 2016's and Huang et al.'s fields."""
    options = dict(shortcut_variant=model.shortcut_variant, shortcut_scale=model.shortcut_scale,
                   scale_on=model.scale_on, gate_bias=model.gate_bias, shortcut_dropout=model.shortcut_dropout,
                   stochastic_depth=model.stochastic_depth, stochastic_depth_mode=model.stochastic_depth_mode)
    if model.activation_order:
        options["activation_order"] = model.activation_order
    return options


def _check_model_options(model: ml_collections.ConfigDict) -> None:
    """A field that the chosen variant never reads, set to anything but its default, is a
    run that does not do what its config says."""
    defaults = default_config().model
    for field, variants in _VARIANT_FIELDS.items():
        if model[field] != defaults[field] and model.shortcut_variant not in variants.split("|"):
            raise UserError(f"model.{field}={model[field]} is only read by model.shortcut_variant={variants}, "
                            f"not {model.shortcut_variant}")
    if model.stochastic_depth_mode != defaults.stochastic_depth_mode and not model.stochastic_depth:
        raise UserError(f"model.stochastic_depth_mode={model.stochastic_depth_mode} needs model.stochastic_depth > 0")


def _check_optim_and_ema(optim: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> None:
    """The optimiser's and the weight EMA's fields: in range, and none set that nothing reads."""
    defaults = default_config()
    if optim.nesterov and optim.name not in ("sgd", "lars"):
        raise UserError(f"optim.nesterov=True is only read by optim.name=sgd|lars, not {optim.name}")
    if optim.trust_coefficient != defaults.optim.trust_coefficient and optim.name != "lars":
        raise UserError(f"optim.trust_coefficient={optim.trust_coefficient} is only read by optim.name=lars, "
                        f"not {optim.name}")
    _positive(optim.trust_coefficient, "optim.trust_coefficient")
    if not 0 <= train.ema_decay < 1:
        raise UserError(f"train.ema_decay must be in [0, 1) (0 = no weight EMA; e.g. 0.9999), got {train.ema_decay}")
    if train.ema_warmup and not train.ema_decay:
        raise UserError("train.ema_warmup=True needs train.ema_decay > 0 (the decay it warms up to)")
    for field in ("ema_warmup_gamma", "ema_warmup_power"):
        if train[field] != defaults.train[field] and not train.ema_warmup:
            raise UserError(f"train.{field}={train[field]} is only read with train.ema_warmup=True")
        _positive(train[field], f"train.{field}")


def _check_loss_and_mixing(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The training loss, label smoothing and Mixup/CutMix fields."""
    data, train = config.data, config.train
    _choice(train.loss, LOSSES, "train.loss")
    if not 0 <= config.optim.label_smoothing < 1:
        raise UserError(f"optim.label_smoothing must be in [0, 1), got {config.optim.label_smoothing}")
    if not 0 <= train.bce_target_threshold < 1:
        raise UserError(f"train.bce_target_threshold must be in [0, 1) (0 = off), got {train.bce_target_threshold}")
    if train.bce_target_threshold and train.loss != "sigmoid":
        raise UserError(f"train.bce_target_threshold={train.bce_target_threshold} is only read by train.loss=sigmoid")
    for field in ("mixup_alpha", "cutmix_alpha"):
        if data[field] < 0:
            raise UserError(f"data.{field} must be >= 0 (0 = off), got {data[field]}")
    for field in ("mix_prob", "mix_switch_prob"):
        if not 0 <= data[field] <= 1:
            raise UserError(f"data.{field} is a probability, in [0, 1]; got {data[field]}")
    per_device = train.batch_size // num_devices
    if mixing_enabled(data) and per_device % 2:
        raise UserError(f"Mixup/CutMix pairs example 2k with 2k+1 of each device's part of the batch, and "
                        f"train.batch_size={train.batch_size} over {num_devices} device(s) is {per_device} a device; "
                        f"use a multiple of {2 * num_devices}")


def mixing_enabled(data: ml_collections.ConfigDict) -> bool:
    """Whether `data` asks for Mixup or CutMix on some batches (resnet_jax.data.mix)."""
    return (data.mixup_alpha > 0 or data.cutmix_alpha > 0) and data.mix_prob > 0


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises UserError (one clear line) for anything that would fail later."""
    model, data, train, optim = config.model, config.data, config.train, config.optim
    try:
        models.create(
            model.name, family=model.family or None, shortcut=model.shortcut,
            zero_init_residual=model.zero_init_residual, bottleneck_stride=model.bottleneck_stride,
            **model_options(model),
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    _check_model_options(model)
    _choice(model.dtype, DTYPES, "model.dtype")
    _choice(data.source, SOURCES, "data.source")
    _choice(data.pipeline, PIPELINES, "data.pipeline")
    _choice(data.normalization, NORMALIZATIONS, "data.normalization")
    _choice(optim.name, OPTIMIZERS, "optim.name")
    _check_optim_and_ema(optim, train)
    _choice(optim.schedule, SCHEDULES, "optim.schedule")
    _choice(optim.warmup, WARMUPS, "optim.warmup")
    _choice(optim.boundaries_unit, BOUNDARY_UNITS, "optim.boundaries_unit")
    _choice(config.parallel.backend, BACKENDS, "parallel.backend")
    for field in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(train[field], f"train.{field}")
    for field in ("num_classes", "image_size"):
        _positive(data[field], f"data.{field}")
    _positive(optim.lr, "optim.lr")
    if not 0 <= model.dropout_rate < 1:
        raise UserError(f"model.dropout_rate must be in [0, 1), got {model.dropout_rate}")
    if train.steps_per_dispatch < 0:
        raise UserError(f"train.steps_per_dispatch must be >= 0 (0 = auto), got {train.steps_per_dispatch}")
    if min(train.eval_every, optim.warmup_steps, data.crop_padding, train.total_epochs, optim.warmup_epochs) < 0:
        raise UserError("train.eval_every, train.total_epochs, optim.warmup_steps, optim.warmup_epochs and "
                        "data.crop_padding must be >= 0")
    for field in ("batch_size", "eval_batch_size"):
        if train[field] % num_devices:
            raise UserError(
                f"train.{field}={train[field]} does not divide over {num_devices} devices; "
                f"use a multiple of {num_devices}"
            )
    if optim.schedule == "multistep" and optim.boundaries_unit == "fraction":
        if any(not 0 < b < 1 for b in optim.boundaries):
            raise UserError(f"optim.boundaries {tuple(optim.boundaries)} must be fractions in (0, 1) "
                            "with optim.boundaries_unit=fraction")
    if data.source == "npz" and not data.path:
        raise UserError("data.source=npz needs data.path=FILE.npz")
    if data.source == "npz":
        if not os.path.isfile(data.path):
            raise UserError(f"data file not found: {data.path}")
    if data.pipeline == "stream" and data.source != "tfds":
        raise UserError("data.pipeline=stream reads TFDS datasets; use data.pipeline=device for "
                        f"data.source={data.source}")
    eval_names = parse_splits(data.eval_splits)
    if train.early_stopping_split and train.early_stopping_split not in eval_names:
        raise UserError(f"train.early_stopping_split={train.early_stopping_split!r} is not one of data.eval_splits "
                        f"({', '.join(eval_names)})")
    _check_loss_and_mixing(config, num_devices)


def steps(num_steps: int, num_epochs: float, steps_per_epoch: int, field: str = "train.total") -> int:
    """A duration given in steps or in epochs (the other one 0), in steps.

    So `train.total_epochs=90` means 90 epochs at any batch size (big_vision's `u.steps`).

    Raises:
      UserError: both given, which would leave one silently ignored.
    """
    if num_steps > 0 and num_epochs > 0:
        raise UserError(f"{field}_steps={num_steps} and {field}_epochs={num_epochs} are both set; give one of them "
                        f"as 0 (e.g. --config.{field}_epochs=0)")
    return round(num_epochs * steps_per_epoch) if num_epochs > 0 else int(num_steps)


def validate_lengths(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Checks what depends on the training length, once the data is known; returns it.

    Raises:
      UserError: a warm-up or lr boundary at or past the end.
    """
    train, optim = config.train, config.optim
    total = steps(train.total_steps, train.total_epochs, steps_per_epoch)
    warmup = steps(optim.warmup_steps, optim.warmup_epochs, steps_per_epoch, "optim.warmup")
    _positive(total, "the training length (train.total_steps or train.total_epochs)")
    # Absolute step boundaries past the end are refused; epoch ones are not (a shortened
    # ImageNet run keeps its recipe), nor fractions, which cannot be.
    if optim.schedule == "multistep" and optim.boundaries_unit == "steps":
        late = [b for b in optim.boundaries if b >= total]
        if late:
            raise UserError(f"optim.boundaries {tuple(optim.boundaries)} reach past train.total_steps={total}: {late}")
    if warmup >= total:
        raise UserError(f"the warm-up ({warmup} steps) is not shorter than training ({total} steps)")
    return total
