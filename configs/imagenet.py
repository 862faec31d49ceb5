"""ResNets on ImageNet (ILSVRC-2012): the standard 90-epoch recipe.

    python -m resnet_jax.main --config=imagenet:resnet50 --workdir=runs/r50
    python -m resnet_jax.main --config=imagenet:resnet50,cosine --workdir=runs/r50c
    python -m resnet_jax.main --config=imagenet:resnet50d,cosine --workdir=runs/r50d

Batch 256 x k with lr 0.1 x batch/256 (Goyal et al.), SGD momentum 0.9, weight decay 1e-4,
lr / 10 at epochs 30, 60, 80 (or cosine after a 5-epoch linear warm-up), 90 epochs;
random-resized crop 224 + flip; eval resize 256 + center crop 224. Expected top-1 error:
ResNet-18 ~30.2 %, -34 ~26.7 %, -50 ~23.9 % (torchvision v1.5), -101 ~22.6 %, -152 ~21.7 %.
ResNet-50-D (deep stem, pooled projections) and SE-ResNet-50 gain about 1 % top-1 over ResNet-50
at the same recipe (He et al. 2019, Table 5: 77.16 % top-1 for -D, 76.21 % for -B with their
tricks off; Hu et al. 2018, Table 2: SE-ResNet-50 23.29 % top-1 error vs 24.80 %).
Needs TFDS imagenet2012 prepared by hand (manual download) under data.data_dir.
"""

from resnet_jax.config import default_config

VARIANTS = {  # for `resnet-jax configs`
    "resnet18 ... resnet200": "the model (first); also plain18, plain34",
    "resnet18d ... resnet200d": "ResNet-D (timm's): deep 3x3 stem, average-pooled projections; plain50d its twin",
    "seresnet18 ... seresnet152": "squeeze-excitation (timm's, C/16) in every block; seplain50, seresnet50d",
    "cosine": "cosine decay after a 5-epoch linear warm-up instead of /10 at epochs 30, 60, 80",
}


def get_config(arg: str = "resnet50"):
    """`arg` is "<model>" or "<model>,cosine": resnet18 ... resnet200, plain18, plain34, resnet18d ...
    resnet200d, seresnet18 ... seresnet152 (any name `models.create` takes)."""
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
    config.train.eval_batch_size = 500
    # In epochs, so a larger batch (and its larger lr) trains the same 90 epochs.
    config.train.total_steps, config.train.total_epochs = 0, 90
    config.train.log_every = 500
    config.train.checkpoint_every = 5000
    # A reference: overriding --config.train.batch_size rescales the lr with it.
    with config.optim.ignore_type():
        config.optim.lr = config.train.get_ref("batch_size") * (0.1 / 256)
    if schedule == "cosine":
        config.optim.schedule = "cosine"
        config.optim.warmup_epochs = 5
    elif schedule:
        raise ValueError(f"unknown ImageNet schedule {schedule!r}; use '<model>' or '<model>,cosine'")
    else:
        config.optim.schedule = "multistep"
        config.optim.boundaries = (30, 60, 80)
        config.optim.boundaries_unit = "epochs"
    return config
