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


# With `--dist loadfile` a worker takes a whole file at a time, in collection order (xdist's
# default reorders files by test count, which starts the many quick parametrised tests first
# and leaves the long few-test files for the end, where one of them can keep a single worker
# busy while the other idles). These files take the longest (measured with --durations); they
# start first, the rest follow in the usual order.
LONGEST_FIRST = (
    "test_reliability.py", "test_train.py", "test_models.py", "test_parallel.py", "test_preact.py",
    "test_sharing.py", "test_identity_mappings.py", "test_recipes.py", "test_analyses.py",
    "test_claims.py", "test_faults.py", "test_mix.py", "test_benchmark.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
