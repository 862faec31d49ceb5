"""He et al. 2015, Sec. 4.2: ResNets and plain nets on CIFAR-10 (and CIFAR-100).

    python -m resnet_jax.main --config=configs/cifar.py:resnet56 --workdir=runs/r56
    python -m resnet_jax.main --config=configs/cifar.py:plain20,cifar100 --workdir=runs/p20c100

Offline: add --config.data.source=npz --config.data.path=../shared/data/cifar10/cifar10.npz

Expected test error on CIFAR-10 (paper, Table 6): ResNet-20 8.75 %, -32 7.51 %, -44 7.17 %,
-56 6.97 %, -110 6.43 %; plain nets get worse with depth (Fig. 6: plain-20 ~9.5 %, plain-56
~13.5 %). Batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
48k steps, 64k steps (164 epochs of 50k); 4-pixel pad + random crop + flip; per-pixel mean.
ResNet-110 and deeper warm up at lr 0.01 for 400 steps.
"""

from resnet_jax.config import default_config

DATASETS = {"cifar10": 10, "cifar100": 100}


def get_config(arg: str = "resnet20"):
    """`arg` is "<model>" or "<model>,<dataset>": resnet20 ... resnet1202, plain20 ... plain110
    (any 6n+2 depth), and cifar10 (default) or cifar100."""
    name, _, dataset = arg.partition(",")
    dataset = dataset or "cifar10"
    if dataset not in DATASETS:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    config = default_config()
    config.model.name = name
    config.model.family = "cifar"
    config.data.name = dataset
    config.data.num_classes = DATASETS[dataset]
    depth = int("".join(c for c in name if c.isdigit()) or 0)
    if depth >= 110:  # "0.01 to warm up the training until the training error is below 80%"
        config.optim.warmup_steps = 400
        config.optim.warmup = "constant"
        config.optim.warmup_lr = 0.01
    return config
