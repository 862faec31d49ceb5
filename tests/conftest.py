"""Test-wide settings. JAX's persistent compilation cache lets the many small runs (and
their subprocesses, which inherit the environment) reuse compiled steps instead of
recompiling identical programs on a 2-core CPU."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "resnet_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
