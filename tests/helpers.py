"""Shared by the tests: a tiny, fast run config and ways to run the trainer for real."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ResNet-8 on the 8x8 digits, shortened: compiles and runs in seconds on CPU.
TINY = {
    "train.total_steps": 20, "train.batch_size": 32, "train.eval_batch_size": 120, "train.log_every": 5,
    "train.eval_every": 10, "train.checkpoint_every": 10, "train.steps_per_dispatch": 1,
    "train.progress": False, "data.train_split": "train[:512]", "data.eval_splits": "test=test[:120]",
}


def tiny_config(**overrides):
    """configs/digits.py:resnet8 with TINY and `overrides` (dotted names) applied:
    tiny_config(**{"train.total_steps": 40})."""
    from configs import digits

    return override(digits.get_config("resnet8"), {**TINY, **overrides})


def override(config, overrides: dict):
    """`config` with `overrides` ({"train.total_steps": 40, ...}, dotted names) applied in place."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def cli_args(config_overrides: dict) -> list[str]:
    """The `--config.x=y` flags that make configs/digits.py:resnet8 into tiny_config(**overrides)."""
    return [f"--config.{k}={v}" for k, v in {**TINY, **config_overrides}.items()]


def run_main(workdir, overrides: dict | None = None, devices: int = 1, extra_args=(), timeout=600,
             check=True, **popen_kwargs) -> subprocess.CompletedProcess:
    """`python -m resnet_jax.main --config=configs/digits.py:resnet8 ...` in a subprocess with
    `devices` fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "resnet_jax.main", f"--config={ROOT}/configs/digits.py:resnet8",
            f"--workdir={workdir}", *cli_args(overrides or {}), *extra_args]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen_kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def restore_state(workdir, step=None):
    """The TrainState saved in `workdir` (host numpy arrays) and its step."""
    from resnet_jax import restore

    return restore.load_state(str(workdir), step)


def tree_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
