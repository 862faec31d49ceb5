"""What a run ran on: the card and the versions, in this process or from a child's view.

A process that only launches runs on a GPU must not start a JAX backend itself (it would take
memory the runs need), so it asks a child (`probe`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "torchvision")

_DESCRIBE = """
import importlib.metadata as md, importlib.util, json, platform, jax
d = jax.devices()
v = {}
for p in PACKAGES:
    try: v[p] = md.version(p)
    except md.PackageNotFoundError: pass
torch_gpu = None
if d[0].platform == 'gpu' and importlib.util.find_spec('torch'):
    import torch; torch_gpu = torch.cuda.is_available()
INFO = {'backend': jax.default_backend(), 'device_kind': d[0].device_kind, 'device_count': len(d),
        'host': platform.node(), 'python': platform.python_version(), 'versions': v, 'torch_gpu': torch_gpu}
"""


def describe() -> dict:
    """{backend, device_kind, device_count, host, python, versions, torch_gpu} of this process
    (starts its JAX backend)."""
    scope = {"PACKAGES": PACKAGES}
    exec(_DESCRIBE, scope)  # the same lines `probe` runs in a child
    return scope["INFO"]


def probe(cwd: str | None = None, env: dict | None = None) -> dict:
    """`describe()` of a child process.

    Raises:
      RuntimeError: JAX does not start (the message is its last line of error).
    """
    code = f"PACKAGES = {PACKAGES!r}\n{_DESCRIBE}\nprint('PROBE ' + json.dumps(INFO))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **(env or {})))
    line = next((l for l in result.stdout.splitlines() if l.startswith("PROBE ")), None)
    if line is None:
        raise RuntimeError(f"JAX does not start here: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(line[len("PROBE "):])


def card(info: dict) -> str:
    """"1 x NVIDIA H200 (gpu)" from a `describe()`."""
    return f"{info.get('device_count')} x {info.get('device_kind')} ({info.get('backend')})"


def line(info: dict) -> str:
    """One line for a table: card, host's CPU cores and load, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        load = ", load average %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    versions = info.get("versions", {})
    return (f"{info.get('host')}: {card(info)}, {os.cpu_count()} CPU cores ({cpu}){load}; jax "
            f"{versions.get('jax')}, Python {info.get('python')}")
