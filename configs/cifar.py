"""He et al. 2015, Sec. 4.2: ResNets and plain nets on CIFAR-10 (and CIFAR-100).

    python -m resnet_jax.main --config=cifar:resnet56 --workdir=runs/r56
    python -m resnet_jax.main --config=cifar:plain20,cifar100 --workdir=runs/p20c100
    python -m resnet_jax.data.cifar_npz cifar-10-python.tar.gz cifar10.npz   # offline: make the .npz once
    python -m resnet_jax.main --config=cifar:plain56,short,npz --config.data.path=cifar10.npz --workdir=runs/p56_short

The variant is "<model>[,<option>...]": the model (resnet20 ... resnet1202, plain20 ...
plain110, any depth 6n+2; pre-activation preresnet110, preresnet164, preresnet1001 and their
plain twins preplain<depth>), then in any order at most one dataset (cifar10, cifar100), one
schedule (paper, gpu_paper, short, smoke, gpu), one data source (tfds, npz, synthetic), `sd`
(stochastic depth, Huang et al.: p_L = 0.5, linear decay) and `modern`; see VARIANTS.

    python -m resnet_jax.main --config=cifar:preresnet164 --workdir=runs/pre164
    python -m resnet_jax.main --config=cifar:resnet110,sd --workdir=runs/r110sd
    python -m resnet_jax.main --config=cifar:resnet56,modern --workdir=runs/r56m

`modern` (see _apply_modern) puts label smoothing, CutMix, a weight EMA, cosine decay and
Nesterov momentum on the same 64k steps. What it should reach: there is no published figure
for this exact combination on ResNet-56; it should beat the paper's 6.97 % (the ablation's
point is by how much, and whether plain nets gain more); not yet measured here.

He et al. 2016 (Identity Mappings), Table 2/3: ResNet-110 6.61 % -> pre-activation 6.37 %,
ResNet-164 5.93 % -> 5.46 %, ResNet-1001 4.92 % (CIFAR-10, the same recipe; the 1000-layer
nets in the authors' code train with batch 64). Huang et al.: ResNet-110 with stochastic
depth 5.25 % (their 500-epoch schedule, not this one).
Every run of experiments/degradation.py and experiments/skip_ablation.py is one of these,
so each cell of their tables reproduces with the command they print.

Expected test error on CIFAR-10 (paper, Table 6): ResNet-20 8.75 %, -32 7.51 %, -44 7.17 %,
-56 6.97 %, -110 6.43 %; plain nets get worse with depth (Fig. 6: plain-20 ~9.5 %, plain-56
~13.5 %). Batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
48k steps, 64k steps (164 epochs of 50k); 4-pixel pad + random crop + flip; per-pixel mean.
ResNet-110 and deeper warm up at lr 0.01 for 400 steps.
"""

import dataclasses

from resnet_jax.config import default_config

DATASETS = {"cifar10": 10, "cifar100": 100}
SOURCES = ("tfds", "npz", "synthetic")
PAPER_STEPS = 64_000
NPZ_EVAL = "test=test,test_exact=test_exact?"  # test_exact where the .npz has it


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long, how often and on which splits a run trains; the rest is the recipe."""

    summary: str
    total_steps: int
    batch_size: int
    lr: float
    log_every: int
    eval_every: int
    checkpoint_every: int
    eval_batch_size: int
    # Data source -> eval splits; the first is the headline (and picks the best checkpoint).
    # An .npz may also hold `test_exact` (say, the byte-exact test images where the rest of
    # its `test` split are re-encoded copies): evaluated where the file has it ("?").
    eval_splits: dict
    train_split: str = "train"
    source: str = "tfds"  # when the variant names none
    image_size: int = 32  # synthetic images only
    synthetic_examples: int = 2048
    keep_checkpoints: int = 3
    steps_per_dispatch: int = 0  # auto: 1 on CPU, more on an accelerator (resnet_jax/config.py)
    dtype: str = ""  # compute dtype; "": the config's default (float32)


SCHEDULES = {
    "paper": Schedule(
        "the recipe, evaluated every 1,000 steps: 64k steps of batch 128, lr 0.1 /10 at 32k and 48k",
        total_steps=PAPER_STEPS, batch_size=128, lr=0.1, log_every=100, eval_every=1000, checkpoint_every=1000,
        eval_batch_size=1000,
        eval_splits={"tfds": "test=test", "npz": NPZ_EVAL, "synthetic": "test=test"}),
    "gpu_paper": Schedule(
        "the recipe as the paper ran it, on one GPU: 64k steps of batch 128 in bfloat16 compute, 8 steps a "
        "dispatch, evaluated every 1,000 steps on the 1,000 exact test images (npz) and the test set, "
        "one checkpoint, at the end (and on SIGTERM)",
        total_steps=PAPER_STEPS, batch_size=128, lr=0.1, log_every=200, eval_every=1000, checkpoint_every=PAPER_STEPS,
        eval_batch_size=1000, keep_checkpoints=1, steps_per_dispatch=8, dtype="bfloat16",
        # test_exact first: the headline and the paper's curves; the full test set for Table 6.
        eval_splits={"tfds": "test=test", "npz": "test_exact=test_exact?,test=test", "synthetic": "test=test"}),
    "gpu": Schedule(
        "the recipe's shape in 16k steps (41 epochs): batch 128, lr 0.1 /10 at 50 % and 75 %, evaluated "
        "every 2,000 steps, 1 checkpoint kept (small enough to carry off a device)",
        total_steps=16_000, batch_size=128, lr=0.1, log_every=200, eval_every=2000, checkpoint_every=2000,
        eval_batch_size=1000, keep_checkpoints=1,
        eval_splits={"tfds": "test=test", "npz": NPZ_EVAL, "synthetic": "test=test"}),
    "short": Schedule(
        "the recipe's shape in 480 steps of batch 32 (31 % of an epoch), lr 0.025 (0.1 x 32/128), "
        "evaluated on 1,000 test images: a CPU run that shows how each net starts to train",
        total_steps=480, batch_size=32, lr=0.025, log_every=10, eval_every=120, checkpoint_every=120,
        eval_batch_size=500,
        eval_splits={"tfds": "test1k=test[:1000]", "npz": "test1k=test[:1000]", "synthetic": "test=test"}),
    "smoke": Schedule(
        "a pipeline check in seconds: 8 steps of batch 16 on 128 random 16x16 images (unless a source "
        "is named); its errors mean nothing",
        total_steps=8, batch_size=16, lr=0.05, log_every=2, eval_every=4, checkpoint_every=4, eval_batch_size=100,
        train_split="train[:512]", source="synthetic", image_size=16, synthetic_examples=128,
        eval_splits={"tfds": "test=test[:200]", "npz": "test=test[:200]", "synthetic": "test=test"}),
}

# For `resnet-jax configs`.
VARIANTS = {
    "resnet<6n+2>, plain<6n+2>": "the model (first): resnet20 ... resnet1202, plain20 ... plain110",
    "cifar10 | cifar100": "the dataset (default cifar10)",
    **{name: schedule.summary for name, schedule in SCHEDULES.items()},
    "tfds | npz | synthetic": "the data source (default tfds); npz needs --config.data.path=FILE.npz",
    "preresnet<depth>, preplain<depth>": "pre-activation nets (He et al. 2016): basic 6n+2 (preresnet110), "
                                         "bottleneck 9n+2 from 164 (preresnet164, preresnet1001)",
    "sd": "stochastic depth (Huang et al.): model.stochastic_depth=0.5, the last block kept with p_L = 0.5",
    "modern": "a 2020s recipe on the same schedule: cosine lr, Nesterov, weight decay 5e-4 off BN and biases, "
              "label smoothing 0.1, CutMix (alpha 1, half the batches), weight EMA 0.999 with timm's warm-up",
}
OPTIONS = ("sd", "modern")


def get_config(arg: str = "resnet20"):
    """`arg` is "<model>[,<option>...]" (see the module docstring and VARIANTS)."""
    name, *options = [part.strip() for part in arg.split(",")]
    chosen = {"dataset": [o for o in options if o in DATASETS], "schedule": [o for o in options if o in SCHEDULES],
              "source": [o for o in options if o in SOURCES]}
    unknown = [o for o in options if not any(o in group for group in chosen.values()) and o not in OPTIONS]
    if unknown and unknown[0].startswith("cifar"):
        raise ValueError(f"unknown CIFAR dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    if unknown:
        raise ValueError(f"unknown CIFAR variant option {unknown[0]!r}; choose datasets from {', '.join(DATASETS)}, "
                         f"schedules from {', '.join(SCHEDULES)}, sources from {', '.join(SOURCES)}, or "
                         f"{', '.join(OPTIONS)}")
    for kind, values in chosen.items():
        if len(values) > 1:
            raise ValueError(f"more than one {kind} in the CIFAR variant {arg!r}: {', '.join(values)}")
    dataset = (chosen["dataset"] or ["cifar10"])[0]
    config = default_config()
    config.model.name = name
    config.model.family = "cifar"
    config.data.name = dataset
    config.data.num_classes = DATASETS[dataset]
    depth = int("".join(c for c in name if c.isdigit()) or 0)
    if name.startswith("pre") and depth >= 164 and (depth - 2) % 9 == 0:
        # resnet-pre-act.lua: projection shortcuts where the shape changes, stride on the first 1x1.
        config.model.shortcut, config.model.bottleneck_stride = "B", "v1"
    if "sd" in options:
        config.model.stochastic_depth = 0.5  # Huang et al.: p_L = 0.5
    if "modern" in options:
        _apply_modern(config)
    if depth >= 110:  # "0.01 to warm up the training until the training error is below 80%"
        config.optim.warmup_steps = 400
        config.optim.warmup = "constant"
        config.optim.warmup_lr = 0.01
    schedule = SCHEDULES[chosen["schedule"][0]] if chosen["schedule"] else None
    if schedule:
        _apply_schedule(config, schedule)
    source = (chosen["source"] or [schedule.source if schedule else "tfds"])[0]
    _apply_source(config, source, schedule)
    return config


def _apply_modern(config) -> None:
    """`modern`: what a 2020s recipe changes, on whatever schedule is chosen. Cosine decay
    (no warm-up: the net trains from lr 0.1 as in the paper) replaces the /10 steps; CutMix
    at Yun et al.'s CIFAR setting (alpha 1, probability 0.5); label smoothing 0.1 (Szegedy et
    al.); the weight EMA (decay 0.999 with timm's ModelEmaV3 warm-up: about 0.99 after 1k steps,
    0.999 after 32k) is evaluated beside the raw weights. Weight decay 5e-4, the common modern
    CIFAR value, with BN and biases undecayed. The train error is then against each mixed
    example's dominant label."""
    config.optim.schedule = "cosine"
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-4
    config.optim.decay_bn_and_bias = False
    config.optim.label_smoothing = 0.1
    config.data.cutmix_alpha, config.data.mix_prob = 1.0, 0.5
    config.train.ema_decay, config.train.ema_warmup = 0.999, True


def _apply_schedule(config, schedule: Schedule) -> None:
    train = config.train
    train.total_steps, train.batch_size, train.eval_batch_size = (schedule.total_steps, schedule.batch_size,
                                                                  schedule.eval_batch_size)
    train.log_every, train.eval_every, train.checkpoint_every = (schedule.log_every, schedule.eval_every,
                                                                 schedule.checkpoint_every)
    train.keep_checkpoints, train.steps_per_dispatch = schedule.keep_checkpoints, schedule.steps_per_dispatch
    config.data.train_split = schedule.train_split
    config.optim.lr = schedule.lr
    if schedule.dtype:
        config.model.dtype = schedule.dtype
    if config.optim.warmup_steps:  # ResNet-110+: 400 of 64k steps at lr 0.01, kept in proportion
        config.optim.warmup_steps = max(1, round(config.optim.warmup_steps * schedule.total_steps / PAPER_STEPS))
        config.optim.warmup_lr = config.optim.warmup_lr * schedule.lr / 0.1


def _apply_source(config, source: str, schedule: Schedule | None) -> None:
    config.data.source = source
    if schedule:
        config.data.eval_splits = schedule.eval_splits[source]
    elif source == "npz":
        config.data.eval_splits = NPZ_EVAL
    if source == "synthetic":
        config.data.train_split = "train"
        config.data.image_size = schedule.image_size if schedule else 32
        config.data.synthetic_examples = schedule.synthetic_examples if schedule else 2048
