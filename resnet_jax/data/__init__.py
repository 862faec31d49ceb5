"""Data: sources (where examples come from), the device and stream pipelines, augmentation."""

# ImageNet's per-channel mean and std on the 0..255 scale, shared by every pipeline (torchvision's
# constants x 255). Plain tuples: grain workers import this package without JAX.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
