"""Writes tests/fixtures/timm_preact.npz: a small timm ResNetV2 (pre-activation bottlenecks,
projection shortcuts, stride on the 3x3) with random weights and BN statistics, an input,
and timm's logits in eval and train mode. tests/test_preact.py copies the weights into
resnet_jax's net and compares. torch and timm are not project dependencies: run this in a
separate environment (it was made with timm 1.0.31, torch 2.13.0 CPU):

    python3 -m venv /tmp/venv-timm && /tmp/venv-timm/bin/pip install torch==2.13.0 timm
    /tmp/venv-timm/bin/python scripts/make_timm_preact_fixture.py
"""

import numpy as np
import timm
import torch
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import ResNetV2

torch.manual_seed(0)
model = ResNetV2(layers=[2, 1, 1], channels=(32, 64, 128), num_classes=5, stem_chs=8, conv_layer=create_conv2d,
                 norm_layer=BatchNormAct2d)
# The CIFAR stem (one 3x3 convolution, no pooling), as in the authors' resnet-pre-act.lua.
model.stem = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
arrays = {}
with torch.no_grad():
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    for name, tensor in list(model.state_dict().items()):
        if not name.endswith("num_batches_tracked"):
            arrays["w:" + name] = tensor.numpy().copy()  # a copy: training below updates the statistics
    x = torch.randn(4, 3, 16, 16)
    arrays["input_nhwc"] = x.permute(0, 2, 3, 1).numpy()
    model.eval()
    arrays["logits_eval"] = model(x).numpy()
    # The unit outputs after the stem and each stage (NHWC), for locating a difference.
    y = model.stem(x)
    arrays["stem_nhwc"] = y.permute(0, 2, 3, 1).numpy()
    for i, stage in enumerate(model.stages):
        y = stage(y)
        arrays[f"stage{i + 1}_nhwc"] = y.permute(0, 2, 3, 1).numpy()
    model.train()
    arrays["logits_train"] = model(x).numpy()
arrays["timm_version"] = np.array(timm.__version__)
arrays["param_count"] = np.array(sum(p.numel() for p in model.parameters()))
np.savez("tests/fixtures/timm_preact.npz", **arrays)
print({k: v.shape for k, v in arrays.items() if not k.startswith("w:")}, len(arrays))
print([k for k in arrays if k.startswith("w:")][:30])
