"""One device mesh with a `data` axis, its shardings, and compiling a step over it.

jit + shard_map + NamedSharding, no pmap: the state is replicated (P()), the batch is split on
its leading axis over DATA_AXIS, and the compiled step donates the old state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "BN_MODES",
    "BatchNormMode",
    "make_mesh",
    "replicated",
    "data_sharded",
    "check_global_batch",
    "host_to_global",
    "put_global",
    "to_host",
    "compile_step",
]

DATA_AXIS = "data"


class BatchNormMode(NamedTuple):
    """How BatchNorm statistics are computed in a sharded step.

    model_axis_name: pass to the model (`bn_axis_name`): BN averages batch statistics over this
      mesh axis, i.e. over the global batch.
    average_batch_stats: pass to the step: average the running statistics across devices after
      the update (needed when each device normalises with its own statistics).
    """

    model_axis_name: str | None
    average_batch_stats: bool


BN_MODES = {
    # SimCLR's default: statistics over the whole global batch; the step is then exactly the
    # single-device step on the concatenated batch.
    "global": BatchNormMode(model_axis_name=DATA_AXIS, average_batch_stats=False),
    # Each device normalises with the statistics of its own shard (PyTorch DDP without SyncBN).
    "local": BatchNormMode(model_axis_name=None, average_batch_stats=True),
}


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named DATA_AXIS over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    # Auto axes: jit may reshard an input whose placement differs instead of rejecting it.
    return jax.make_mesh(
        (len(devices),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (the train state, keys)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over DATA_AXIS."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """ValueError unless the global batch splits evenly over the devices of the mesh."""
    n = mesh.shape[DATA_AXIS]
    if global_batch <= 0 or global_batch % n:
        raise ValueError(
            f"the global batch size ({global_batch}) must be a positive multiple of the number "
            f"of devices ({n}); try batch_size={max(n, global_batch // n * n)}"
        )


def host_to_global(batch: Any, mesh: Mesh) -> Any:
    """This process's part of a batch (pytree of [b_local, ...] arrays) -> global jax.Arrays.

    Every process passes its own rows; the result is split over DATA_AXIS, with global leading
    size b_local * process_count.
    """
    sharding = data_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        check_global_batch(x.shape[0] * jax.process_count(), mesh)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (numpy, or arrays on one device), the same on every process, laid out by
    `sharding` over a mesh that may span several processes (where jax.device_put refuses
    devices of other processes): each process fills its own devices from its copy."""

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array as numpy on every process, also when the mesh spans several
    processes (where np.asarray of a split array fails: other processes hold some rows)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compile_step(step_fn: Callable, mesh: Mesh, *, donate_state: bool = True) -> Callable:
    """jit(shard_map(step_fn)) over `mesh`: (state, batch, key) -> (state, metrics).

    step_fn: a step with its keyword dependencies bound (functools.partial); its `axis_name` is
    bound here to DATA_AXIS. The state and key are replicated, every leaf of the batch is split
    on its leading axis, the returned state and metrics are replicated. The input state's
    buffers are donated (reused for the output) unless donate_state is False.
    """
    sharded = jax.shard_map(
        functools.partial(step_fn, axis_name=DATA_AXIS),
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P()),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=(0,) if donate_state else ())
