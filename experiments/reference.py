"""The plain train steps that resnet_jax's speed is compared against, written without resnet_jax.

    python -m experiments.reference jax r56 128            # a plain Flax ResNet-56 step, batch 128
    python -m experiments.reference torch r50 256          # torchvision's ResNet-50, eager
    python -m experiments.reference torch_compile r50 256  # the same under torch.compile

Usage: KIND MODEL BATCH [STEPS]. KIND is jax, torch or torch_compile (torch only where it
imports: `pip install torch torchvision`; on a CUDA GPU where torch sees one); MODEL is r50
(ImageNet ResNet-50, 224 px, 1000 classes) or r<6n+2> (He et al.'s CIFAR ResNet with
option-A shortcuts, 32 px, 10 classes: r20, r56, r8). Prints one line,
`RESULT KIND MODEL B=BATCH <img/s> img/s <ms> ms/step`, which `experiments.device_suite`
reads; `experiments.benchmark` measures resnet_jax's step the same way.

Both are what a user would write first: the jax step in the style of flax/examples/imagenet
(one jitted step, donated buffers, bf16 compute, SGD momentum 0.9 with weight decay 1e-4);
the torch one channels-last under bf16 autocast with cuDNN autotuning. Each runs on one fixed
synthetic batch already on the device; steps are dispatched back to back and waited for once,
after untimed warm-up steps (5 for jax, 10 for torch), so the time is the device's.
"""

from __future__ import annotations

import functools
import re
import sys
import time

KINDS = ("jax", "torch", "torch_compile")
DEFAULT_STEPS = 30


def model_spec(model: str) -> tuple[int, int, int]:
    """"r50" -> (0, 224, 1000); "r56" -> (9, 32, 10): blocks per CIFAR stage (0: ResNet-50),
    image size, classes."""
    if model == "r50":
        return 0, 224, 1000
    match = re.fullmatch(r"r(\d+)", model)
    if not match or int(match.group(1)) < 8 or (int(match.group(1)) - 2) % 6:
        raise ValueError(f"unknown model {model!r}; use r50 or r<6n+2> (r20, r56, r8)")
    return (int(match.group(1)) - 2) // 6, 32, 10


def result_line(kind: str, model: str, batch: int, seconds_per_step: float) -> str:
    return f"RESULT {kind} {model} B={batch} {batch / seconds_per_step:.0f} img/s {seconds_per_step * 1e3:.2f} ms/step"


# ---------------------------------------------------------------------------------------
# Flax.


def flax_model(model: str):
    """The plain Flax net for `model` (bf16 compute, float32 parameters)."""
    import flax.linen as nn  # imported here: the torch reference needs no JAX
    import jax.numpy as jnp

    dtype = jnp.bfloat16
    blocks, _, classes = model_spec(model)

    class Bottleneck(nn.Module):
        filters: int
        stride: int

        @nn.compact
        def __call__(self, x, train):
            conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
            norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                     dtype=dtype)
            y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
            y = nn.relu(norm()(conv(self.filters, (3, 3), (self.stride, self.stride))(y)))
            y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
            if x.shape != y.shape:
                x = norm()(conv(self.filters * 4, (1, 1), (self.stride, self.stride))(x))
            return nn.relu(y + x)

    class ResNet50(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, dtype=dtype)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)(x))
            x = nn.max_pool(x, (3, 3), (2, 2), "SAME")
            for stage, count in enumerate([3, 4, 6, 3]):
                for index in range(count):
                    x = Bottleneck(64 * 2 ** stage, 2 if stage > 0 and index == 0 else 1)(x, train)
            return nn.Dense(classes, dtype=dtype)(x.mean((1, 2)))

    class CifarBlock(nn.Module):
        filters: int
        stride: int

        @nn.compact
        def __call__(self, x, train):
            conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
            norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=dtype)
            y = nn.relu(norm()(conv(self.filters, (3, 3), (self.stride, self.stride))(x)))
            y = norm()(conv(self.filters, (3, 3))(y))
            if x.shape != y.shape:  # option A: subsample, zero-pad the new channels
                x = x[:, ::2, ::2, :]
                pad = self.filters - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
            return nn.relu(y + x)

    class CifarResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Conv(16, (3, 3), use_bias=False, dtype=dtype)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)(x))
            for stage, filters in enumerate([16, 32, 64]):
                for index in range(blocks):
                    x = CifarBlock(filters, 2 if stage > 0 and index == 0 else 1)(x, train)
            return nn.Dense(classes, dtype=dtype)(x.mean((1, 2)))

    return ResNet50() if blocks == 0 else CifarResNet()


def flax_train_step(net, tx):
    """One jitted SGD step on (params, batch_stats, opt_state), buffers donated."""
    import jax  # imported here: the torch reference needs no JAX
    import jax.numpy as jnp
    import optax

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = net.apply({"params": params, "batch_stats": batch_stats}, images,
                                        mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, loss

    return step


def time_flax(model: str, batch: int, steps: int = DEFAULT_STEPS, warmup: int = 5) -> float:
    """Seconds per step of the plain Flax step (after compilation and `warmup` steps)."""
    import jax
    import jax.numpy as jnp
    import optax

    _, size, classes = model_spec(model)
    net = flax_model(model)
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (batch, size, size, 3), jnp.float32).astype(jnp.bfloat16)
    labels = jax.random.randint(key, (batch,), 0, classes)
    variables = net.init(key, images[:2])
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9))
    step = flax_train_step(net, tx)
    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    for _ in range(warmup):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images, labels)
    jax.block_until_ready(loss if warmup else params)
    start = time.perf_counter()
    for _ in range(steps):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images, labels)
    loss.block_until_ready()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------
# PyTorch.


def torch_model(model: str):
    """torchvision's resnet50, or He et al.'s CIFAR ResNet (option A) in plain torch."""
    import torch.nn as tnn  # imported here: torch is optional
    import torch.nn.functional as F

    blocks, _, classes = model_spec(model)

    class CifarBlock(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False), tnn.BatchNorm2d(cout)
            self.c2, self.b2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout)
            self.pad, self.stride = cout - cin, stride

        def forward(self, x):
            out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            shortcut = x
            if self.stride != 1 or self.pad:
                shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + shortcut)

    class CifarResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16)
            layers, cin = [], 16
            for stage, filters in enumerate([16, 32, 64]):
                for index in range(blocks):
                    layers.append(CifarBlock(cin, filters, 2 if stage > 0 and index == 0 else 1))
                    cin = filters
            self.layers, self.fc = tnn.Sequential(*layers), tnn.Linear(64, classes)

        def forward(self, x):
            return self.fc(self.layers(F.relu(self.bn(self.conv(x)))).mean((2, 3)))

    if blocks == 0:
        import torchvision

        return torchvision.models.resnet50()
    return CifarResNet()


def time_torch(kind: str, model: str, batch: int, steps: int = DEFAULT_STEPS, warmup: int = 10) -> float:
    """Seconds per step of the torch step (on CUDA where torch sees a GPU, else the CPU)."""
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    _, size, classes = model_spec(model)
    net = torch_model(model).to(device).to(memory_format=torch.channels_last)
    if kind == "torch_compile":
        net = torch.compile(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------
# Entry point.


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv if argv is None else argv)[1:]
    if not args or any(a in ("-h", "--help", "-help", "--helpfull") for a in args):
        print(__doc__.strip())
        sys.exit(0 if args else 2)
    try:
        if len(args) not in (3, 4):
            raise ValueError("expected KIND MODEL BATCH [STEPS], e.g. jax r56 128")
        kind, model = args[0], args[1]
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use {', '.join(KINDS)}")
        model_spec(model)
        batch, steps = int(args[2]), int(args[3]) if len(args) == 4 else DEFAULT_STEPS
        if batch < 1 or steps < 1:
            raise ValueError("BATCH and STEPS must be positive")
        if kind.startswith("torch"):
            try:
                import torch  # noqa: F401  (optional: only the torch references need it)
            except ImportError:
                raise ValueError("torch is not installed here (pip install torch torchvision); "
                                 "the jax reference needs only JAX") from None
    except ValueError as error:
        message = str(error) if not str(error).startswith("invalid literal") else "BATCH and STEPS are integers"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    seconds = time_flax(model, batch, steps) if kind == "jax" else time_torch(kind, model, batch, steps)
    print(result_line(kind, model, batch, seconds), flush=True)


if __name__ == "__main__":
    main()
