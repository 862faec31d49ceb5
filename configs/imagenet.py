"""ResNets on ImageNet (ILSVRC-2012): the standard 90-epoch recipe.

    python -m resnet_jax.main --config=imagenet:resnet50 --workdir=runs/r50
    python -m resnet_jax.main --config=imagenet:resnet50,cosine --workdir=runs/r50c
    python -m resnet_jax.main --config=imagenet:resnet50d,cosine --workdir=runs/r50d

Batch 256 x k with lr 0.1 x batch/256 (Goyal et al.), SGD momentum 0.9, weight decay 1e-4,
lr / 10 at epochs 30, 60, 80 (or cosine after a 5-epoch linear warm-up), 90 epochs;
random-resized crop 224 + flip; eval resize 256 + center crop 224. Expected top-1 error:
ResNet-18 ~30.2 %, -34 ~26.7 %, -50 ~23.9 % (torchvision v1.5), -101 ~22.6 %, -152 ~21.7 %.
ResNet-50-D (deep stem, pooled projections) and SE-ResNet-50 gain about 1 % top-1 over ResNet-50
at the same recipe (He et al. 2019, Table 5: 77.16 % top-1 for ResNet-50-D, 76.21 % for ResNet-50
with the same tricks; Hu et al. 2018, Table 2: SE-ResNet-50 23.29 % top-1 error vs 24.80 %).
Needs TFDS imagenet2012 prepared by hand (manual download) under data.data_dir.

Two published recipes, as variants (`imagenet:<model>,rsb_a3`, `imagenet:<model>,ffcv_16`):

    python -m resnet_jax.main --config=imagenet:resnet50,rsb_a3 --workdir=runs/r50_a3
    python -m resnet_jax.main --config=imagenet:resnet50,ffcv_16 --workdir=runs/r50_ffcv16

rsb_a3, timm's "ResNet strikes back" procedure A3 (Wightman, Touvron, Jegou 2021, arXiv
2110.00476, Table 1; timm's resnet50.a3_in1k): 100 epochs at 160 px, tested at 224 px with
crop fraction 0.95, batch 2048, LAMB lr 8e-3 with weight decay 0.02 off BN and biases, 5
warm-up epochs then cosine, binary cross-entropy with target threshold 0.2 and no label
smoothing, Mixup 0.1 / CutMix 1.0, the last BN of each block zero-initialised (timm's
default). It should reach 78.1 % top-1 at 224 px (the paper's A3 figure for ResNet-50).
Left out: RandAugment (rand-m6-mstd0.5) and bicubic resizing (ours is antialiased
bilinear); expect a lower figure without them. timm scales LAMB's lr with sqrt(batch/2048):
set --config.optim.lr when you change the batch.

ffcv_16, FFCV's 16-epoch ResNet-50 (libffcv/ffcv-imagenet rn50_configs/rn50_16_epochs.yaml and
train_imagenet.py): batch 4096 (512 on each of 8 GPUs), SGD momentum 0.9, lr 1.7 rising
linearly from 1.7e-4 over 2 epochs then linearly to 0 at epoch 16, weight decay 1e-4 off BN
(and here off biases too), label smoothing 0.1, trained at 160 px and tested at 256 px
(center crop 224/256 of the shorter side). FFCV reports 73.8 % top-1 (8 x A100, 14.9 min).
Left out: progressive resizing (FFCV goes 160 -> 192 px over epochs 11-13; here 160 px
throughout), BlurPool in the strided convolutions, and test-time flip averaging; expect a
lower figure. Its lr follows the batch linearly (1.7 per 4096).
"""

from resnet_jax.config import default_config

VARIANTS = {  # for `resnet-jax configs`
    "resnet18 ... resnet200": "the model (first); also plain18, plain34",
    "resnet18d ... resnet200d": "ResNet-D (timm's): deep 3x3 stem, average-pooled projections; plain50d its twin",
    "seresnet18 ... seresnet152": "squeeze-excitation (timm's, C/16) in every block; seplain50, seresnet50d",
    "cosine": "cosine decay after a 5-epoch linear warm-up instead of /10 at epochs 30, 60, 80",
    "rsb_a3": "timm's ResNet-strikes-back A3: 100 epochs at 160 px (test 224), LAMB, BCE, Mixup/CutMix",
    "ffcv_16": "FFCV's 16 epochs: batch 4096, linear up/down lr 1.7, label smoothing 0.1, 160 px (test 256)",
}
RECIPES = ("rsb_a3", "ffcv_16")


def get_config(arg: str = "resnet50"):
    """`arg` is "<model>" or "<model>,<variant>" (cosine, rsb_a3, ffcv_16): resnet18 ... resnet200,
    plain18, plain34, resnet18d ... resnet200d, seresnet18 ... seresnet152 (any name `models.create` takes)."""
    name, _, schedule = arg.partition(",")
    config = default_config()
    config.model.name = name
    config.model.family = "imagenet"
    config.model.shortcut = "B"
    config.model.bottleneck_stride = "v1.5"
    config.model.dtype = "bfloat16"
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.num_classes = 1000
    config.data.image_size = 224
    config.data.pipeline = "stream"
    config.data.normalization = "imagenet"
    config.data.eval_splits = "val=validation"
    config.data.workers = 8
    config.train.batch_size = 256
    config.train.eval_batch_size = 512  # divides over 1, 2, 4, 8, 16 ... devices (the last batch is padded)
    # In epochs, so a larger batch (and its larger lr) trains the same 90 epochs.
    config.train.total_steps, config.train.total_epochs = 0, 90
    config.train.log_every = 500
    config.train.checkpoint_every = 5000
    if schedule in ("", "cosine"):
        # A reference: overriding --config.train.batch_size rescales the lr with it.
        with config.optim.ignore_type():
            config.optim.lr = config.train.get_ref("batch_size") * (0.1 / 256)
    if schedule == "cosine":
        config.optim.schedule = "cosine"
        config.optim.warmup_epochs = 5
    elif schedule == "rsb_a3":
        _rsb_a3(config)
    elif schedule == "ffcv_16":
        _ffcv_16(config)
    elif schedule:
        raise ValueError(f"unknown ImageNet schedule {schedule!r}; use '<model>' or '<model>,<variant>' with "
                         f"a variant from cosine, {', '.join(RECIPES)}")
    else:
        config.optim.schedule = "multistep"
        config.optim.boundaries = (30, 60, 80)
        config.optim.boundaries_unit = "epochs"
    return config


def _rsb_a3(config) -> None:
    """timm's A3 (see the module docstring for the source and what is left out)."""
    config.data.image_size, config.data.eval_image_size = 160, 224
    config.data.eval_resize = 235  # timm: floor(224 / 0.95), then the center 224
    config.data.mixup_alpha, config.data.cutmix_alpha = 0.1, 1.0  # mix_prob 1, switch 0.5: timm's
    config.model.zero_init_residual = True  # timm's ResNet zero-inits the last BN of each block
    config.train.batch_size = 2048
    config.train.total_epochs = 100
    config.train.loss, config.train.bce_target_threshold = "sigmoid", 0.2
    config.optim.name, config.optim.lr = "lamb", 8e-3
    config.optim.weight_decay, config.optim.decay_bn_and_bias = 0.02, False
    config.optim.schedule = "cosine"
    config.optim.warmup_epochs, config.optim.warmup_lr = 5, 1e-4


def _ffcv_16(config) -> None:
    """FFCV's rn50_16_epochs.yaml (see the module docstring for the source and what is left out)."""
    config.data.image_size, config.data.eval_image_size = 160, 256
    config.data.eval_resize = 293  # 256 / (224 / 256) = 292.6: FFCV crops 224/256 of the shorter side
    config.train.batch_size = 4096
    config.train.total_epochs = 16
    config.optim.label_smoothing = 0.1
    config.optim.weight_decay, config.optim.decay_bn_and_bias = 1e-4, False
    config.optim.schedule = "linear"  # FFCV's "cyclic": np.interp over [0, 2, 16] epochs
    with config.optim.ignore_type():
        config.optim.lr = config.train.get_ref("batch_size") * (1.7 / 4096)
        config.optim.warmup_lr = config.optim.get_ref("lr") * 1e-4
    config.optim.warmup_epochs = 2
