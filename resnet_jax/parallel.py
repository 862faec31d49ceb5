"""Data parallelism, decided here once: a mesh over every device with one axis, "data".

The trainer writes one per-device step that averages over `AXIS` with `lax.pmean`; this
module wraps that same function in `jax.shard_map` (default) or `jax.pmap`, and moves state
and batches to where each wrapper wants them. Under shard_map, replicated values are global
jax.Arrays with sharding P(); under pmap they carry a leading axis of local devices.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


class Parallel:
    """How this run spreads over devices: `backend` is "shard_map" or "pmap"."""

    def __init__(self, backend: str = "shard_map"):
        self.backend = backend
        self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
        self.num_devices = jax.device_count()
        self.num_local_devices = jax.local_device_count()
        self.num_processes = jax.process_count()
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P(AXIS))
        # pmap takes values with a leading axis of local devices (pmap is single-host here).
        self._pmap_axis = NamedSharding(Mesh(np.asarray(jax.local_devices()), (AXIS,)), P(AXIS))

    def wrap(self, per_device_fn: Callable, in_axes: tuple, out_axes: Any, donate_argnums=()) -> Callable:
        """Maps `per_device_fn` over the devices.

        Args:
          per_device_fn: written for one device; may use collectives over `AXIS`.
          in_axes / out_axes: per argument / output, `None` for replicated values and `0` for
            values split along their first axis (batches).
          donate_argnums: arguments whose buffers the step may reuse (state, accumulators).
        """
        if self.backend == "pmap":
            # pmap sees every argument with a leading device axis (see `replicate`).
            return jax.pmap(per_device_fn, axis_name=AXIS, donate_argnums=donate_argnums)
        spec = lambda axis: P() if axis is None else P(AXIS)
        specs = lambda axes: spec(axes) if not isinstance(axes, tuple) else tuple(spec(a) for a in axes)
        mapped = jax.shard_map(
            per_device_fn, mesh=self.mesh, in_specs=specs(in_axes), out_specs=specs(out_axes), check_vma=False
        )
        return jax.jit(mapped, donate_argnums=donate_argnums)

    def replicate(self, tree):
        """Host values -> one identical copy on every device."""
        if self.backend == "pmap":
            stack = lambda x: np.broadcast_to(np.asarray(x)[None], (self.num_local_devices, *np.shape(x)))
            return jax.device_put(jax.tree.map(stack, tree), self._pmap_axis)
        # make_array_from_callback works across hosts, where each host holds the whole value.
        put = lambda x: jax.make_array_from_callback(np.shape(x), self.replicated, lambda index: np.asarray(x)[index])
        return jax.tree.map(put, tree)

    def shard(self, tree):
        """This host's part of a batch (leading axis) -> split over its devices."""
        if self.backend == "pmap":
            split = lambda x: np.reshape(x, (self.num_local_devices, -1, *np.shape(x)[1:]))
            return jax.device_put(jax.tree.map(split, tree), self._pmap_axis)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.split, np.asarray(x)), tree)

    def unreplicate(self, tree):
        """One host (numpy) copy of a replicated value."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

    def to_global(self, tree):
        """A replicated value as global jax.Arrays with sharding P(): the form Orbax saves,
        the same for both backends and any device count."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: jax.device_put(x, self.replicated), self.unreplicate(tree))
        return tree

    def from_global(self, tree):
        """Inverse of `to_global`."""
        if self.backend == "pmap":
            return self.replicate(jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree))
        return tree

    def describe(self) -> str:
        return (f"{self.num_devices} {jax.devices()[0].platform} device(s) on {self.num_processes} host(s), "
                f"{self.backend}")
