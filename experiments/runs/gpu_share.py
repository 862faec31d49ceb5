"""Several resnet_jax.main processes on one accelerator: memory, the compilation cache, CUDA MPS.

Without MPS, processes on one NVIDIA GPU time-share it (one context at a time); the CUDA
Multi-Process Service lets their kernels run side by side, which is what small CIFAR steps
(the GPU a few percent busy at batch 128) need. `mps` starts its control daemon with its pipe
and log folders in a temporary folder, and stops it on every way out of the `with` block,
including a SIGTERM to the experiment (the supervisor turns that into an orderly exit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator

MPS_CONTROL = "nvidia-cuda-mps-control"


def child_env(concurrent: int, cache_dir: str) -> dict[str, str]:
    """Environment for each of `concurrent` processes sharing one accelerator.

    Each takes only the memory it needs (JAX would preallocate 75 % of the GPU per process),
    and all share one persistent compilation cache, so identical programs compile once.
    """
    env = {"JAX_COMPILATION_CACHE_DIR": cache_dir,
           # Cache even quick compilations: the second of two identical runs then skips them.
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if concurrent > 1:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


@contextlib.contextmanager
def mps(log: Callable[[str], None] = print, enabled: bool = True) -> Iterator[dict[str, str]]:
    """Runs the block under a CUDA MPS daemon when `nvidia-cuda-mps-control` is on PATH.

    Yields:
      The environment the children need to reach the daemon ({} when there is none).
    """
    control = shutil.which(MPS_CONTROL) if enabled else None
    if not enabled:
        yield {}
        return
    if control is None:
        log(f"no {MPS_CONTROL} on PATH: concurrent runs time-share the accelerator without MPS")
        yield {}
        return
    folder = tempfile.mkdtemp(prefix="mps_")
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
    for path in env.values():
        os.makedirs(path)
    full_env = dict(os.environ, **env)
    started = subprocess.run([control, "-d"], env=full_env, capture_output=True, text=True, timeout=60)
    if started.returncode:
        log(f"{MPS_CONTROL} -d failed (exit {started.returncode}: {started.stderr.strip()[-200:]}): "
            "concurrent runs time-share the accelerator without MPS")
        shutil.rmtree(folder, ignore_errors=True)
        yield {}
        return
    log(f"CUDA MPS daemon started (pipe and logs in {folder})")
    # A SIGTERM before the runs' supervisor takes over (or after it hands back) must still
    # unwind through `finally`: Python's default would end the process on the spot.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield env
    finally:
        signal.signal(signal.SIGTERM, previous)
        subprocess.run([control], input="quit\n", env=full_env, capture_output=True, text=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        log("CUDA MPS daemon stopped")


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}")


_interrupt.chain = False  # a supervisor inside the block handles the signal itself
