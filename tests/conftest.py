"""Test-wide settings. JAX's persistent compilation cache lets the many small runs (and
their subprocesses, which inherit the environment) reuse compiled steps instead of
recompiling identical programs on a 2-core CPU."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "resnet_jax_test_xla_cache"))
# Every compilation, however short: a tiny run compiles dozens of small programs (Orbax's
# per-device slices when it saves, the schedule's scalar ops, ...) at ~0.05 s each, the same
# ones in every run; read back from the cache they cost ~2 s less a run.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
