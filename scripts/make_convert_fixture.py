"""Makes tests/fixtures/convert/ once, with torch; tests/test_convert.py checks against it without torch.

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy safetensors
    /tmp/torchvenv/bin/python scripts/make_convert_fixture.py

For torchvision's resnet18 and resnet50 and akamaster's ResNet-20 (its module, written out
below: option-A shortcuts), every tensor of the state dict is drawn from a seed and the key's
name by `seeded_tensor` (numpy only, so the test draws the same weights), loaded into the torch
module, and the module's eval-mode logits on a fixed uint8 image, normalised as the weights'
authors did (pixels / 255, ImageNet mean and std), are saved beside the image and the list of
keys and shapes: `<model>.npz`, a few tens of KB each, no weights.

Beside them, `tiny_zip.pth` and `tiny_legacy.pth`: one small object saved by torch in its zip
and its legacy format (float32, float16 and bfloat16 tensors, a transposed view, a slice at an
offset, a BN layer's state dict with its int64 counter, plain Python values), and
`tiny_expected.npz`, the arrays torch loads back from them.
"""

from __future__ import annotations

import collections
import json
import os
import zlib

import numpy as np

SEED = 20251127
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "convert")
MODELS = {  # name -> (format, image size, images, classes)
    "resnet18": ("torchvision", 64, 2, 1000),
    "resnet50": ("torchvision", 64, 2, 1000),
    "akamaster_resnet20": ("akamaster", 32, 4, 10),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(name: str, count: int, seed: int) -> np.ndarray:
    """`count` floats in [0, 1) from (seed, name): PCG64's raw stream, which numpy keeps
    stable across versions (Generator methods may change theirs)."""
    bits = np.random.PCG64([seed, zlib.crc32(name.encode())]).random_raw(count)
    return (np.asarray(bits, np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def seeded_tensor(key: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
    """The state-dict tensor `key` of `shape`: He-scaled convolutions, BN statistics and
    affine parameters near what training leaves, small biases; float32 (int64 counters)."""
    if key.endswith("num_batches_tracked"):
        return np.asarray(0, np.int64)
    u = _uniform(key, int(np.prod(shape)), seed).reshape(shape)
    centred = 2.0 * u - 1.0  # uniform in [-1, 1): std 1/sqrt(3)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) > 1:  # conv (out, in, kh, kw) or linear (out, in)
        fan_in = int(np.prod(shape[1:]))
        gain = 2.0 if len(shape) == 4 else 1.0
        value = centred * np.sqrt(3.0 * gain / fan_in)
    elif leaf == "weight":  # BN scale
        value = 0.5 + u
    elif leaf == "running_var":
        value = 0.5 + u
    else:  # BN bias, running mean, linear bias
        value = 0.2 * centred
    return value.astype(np.float32)


def seeded_image(name: str, count: int, size: int, seed: int = SEED) -> np.ndarray:
    """uint8 images [N, H, W, 3]."""
    return np.floor(_uniform(name + "/image", count * size * size * 3, seed) * 256).astype(np.uint8).reshape(
        count, size, size, 3)


# ---------------------------------------------------------------------------------------
# Everything below needs torch.


def akamaster_resnet(depth: int, num_classes: int = 10):
    """akamaster/pytorch_resnet_cifar10's resnet.py (option A), under the names of its
    published checkpoints (conv1, bn1, layer*, linear)."""
    import torch.nn as nn
    import torch.nn.functional as F

    class LambdaLayer(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    class BasicBlock(nn.Module):
        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self, num_blocks, num_classes):
            super().__init__()
            self.in_planes = 16
            self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = self._make_layer(16, num_blocks, 1)
            self.layer2 = self._make_layer(32, num_blocks, 2)
            self.layer3 = self._make_layer(64, num_blocks, 2)
            self.linear = nn.Linear(64, num_classes)

        def _make_layer(self, planes, num_blocks, stride):
            layers = []
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(BasicBlock(self.in_planes, planes, s))
                self.in_planes = planes
            return nn.Sequential(*layers)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer3(self.layer2(self.layer1(out)))
            out = F.avg_pool2d(out, out.size()[3]).flatten(1)
            return self.linear(out)

    return ResNet((depth - 2) // 6, num_classes)


def torch_model(name: str, num_classes: int):
    import torchvision

    if name.startswith("akamaster_resnet"):
        return akamaster_resnet(int(name[len("akamaster_resnet"):]), num_classes)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def normalised(images: np.ndarray):
    """NCHW float32 input, as torchvision's ToTensor + Normalize make it."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_model_fixture(name: str) -> None:
    import torch

    fmt, size, count, num_classes = MODELS[name]
    model = torch_model(name, num_classes).eval()
    keys = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    model.load_state_dict({key: torch.from_numpy(seeded_tensor(key, shape)) for key, shape in keys}, strict=True)
    images = seeded_image(name, count, size)
    with torch.no_grad():
        logits = model(normalised(images)).numpy()
    np.savez_compressed(os.path.join(OUT, f"{name}.npz"), image=images, logits=logits.astype(np.float32),
                        seed=np.int64(SEED), format=fmt, keys=json.dumps(keys))
    print(f"{name}: {len(keys)} keys, logits {logits.shape}, |logits| max {np.abs(logits).max():.3g}")


def tiny_object():
    """A small object with every kind of thing a state dict file holds."""
    import torch

    generator = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.normal_(generator=generator)
    bn.num_batches_tracked += 7
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        conv=torch.randn(4, 3, 2, 2, generator=generator),
        transposed=base.t(),  # a non-contiguous view: strides (1, 6)
        sliced=base.view(-1)[5:11],  # a view at storage offset 5
        half=torch.randn(5, generator=generator).half(),
        bfloat=torch.randn(5, generator=generator).bfloat16(),
        long=torch.arange(3, dtype=torch.int64),
        flag=torch.tensor([True, False]),
    )
    state.update({f"bn.{k}": v for k, v in bn.state_dict().items()})
    return {"state_dict": state, "best_prec1": 91.5, "arch": "tiny", "sizes": [1, 2.5, (3, "x")]}


def make_tiny_files() -> None:
    import torch

    obj = tiny_object()
    zip_path, legacy_path = os.path.join(OUT, "tiny_zip.pth"), os.path.join(OUT, "tiny_legacy.pth")
    torch.save(obj, zip_path)
    torch.save(obj, legacy_path, _use_new_zipfile_serialization=False)
    loaded = torch.load(legacy_path, weights_only=True)
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in loaded["state_dict"].items()}
    np.savez_compressed(os.path.join(OUT, "tiny_expected.npz"), **expected)
    print(f"tiny files: {os.path.getsize(zip_path)} and {os.path.getsize(legacy_path)} bytes")


def main() -> None:
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    for name in MODELS:
        make_model_fixture(name)
    make_tiny_files()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{OUT}: {total / 1024:.0f} KB, torch {torch.__version__}")


if __name__ == "__main__":
    main()
