"""The experiments' figures (experiments/plots.py): each draws a readable, non-blank PNG."""

import matplotlib.image
import numpy as np

from experiments import plots


def _assert_png(path, min_width=300, min_height=150):
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    assert image[..., :3].std() > 0.01, "blank image"


def test_degradation_png(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for depth in (20, 56):
        for skip in (False, True):
            for seed in range(2):
                final = 0.07 + (0.0 if skip else 0.001 * depth)
                steps = np.arange(0, 64_001, 1000)
                eval_steps = np.arange(0, 64_001 - 2000 * seed, 4000)  # seed 1 cut short
                runs.append({
                    "depth": depth, "skip": skip, "seed": seed, "steps": steps.tolist(),
                    "train_error": (final - 0.03 + 0.5 * np.exp(-steps / 5000)).tolist(),
                    "eval_steps": eval_steps.tolist(),
                    "test_error": (final + 0.5 * np.exp(-eval_steps / 5000)
                                   + rng.normal(0, 0.002, len(eval_steps))).tolist(),
                })
    _assert_png(plots.degradation_png(runs, tmp_path / "fig6.png"), 900, 350)
    # Only plain runs, short and bad: the right panel says so and the y axis zooms out.
    short = [{"depth": 20, "skip": False, "seed": 0, "steps": [0, 100, 200],
              "train_error": [0.9, 0.6, 0.5], "eval_steps": [200], "test_error": [0.55]}]
    _assert_png(plots.degradation_png(short, tmp_path / "short.png"), 900, 350)


def test_gradient_flow_png(tmp_path):
    profiles = []
    for depth in (20, 56):
        layers = np.arange(depth - 1)
        for skip in (False, True):
            grads = np.full(depth - 1, 0.5) if skip else 0.5 * 0.8 ** (depth - 2 - layers)
            grads[0] = 0.0 if not skip else grads[0]  # zero: dropped from the log axis
            profiles.append({"name": f"{'ResNet' if skip else 'plain'}-{depth}", "skip": skip,
                             "depth": depth, "grad_norms": grads.tolist(),
                             "activation_scales": (1 + 0.02 * layers).tolist()})
    _assert_png(plots.gradient_flow_png(profiles, tmp_path / "grads.png"), 900, 350)
