"""MoCo's queue of negatives: a ring buffer of the most recent keys, as a pytree in the state.

keys: float32 [K, D], unit rows; ptr: int32 [], the row the next batch of keys starts at. Every
step writes the keys of the whole global batch (gathered from all devices, in global order) at
ptr and advances it by that many rows, modulo K. K must be a multiple of the keys written per
step, so a batch never straddles the end (MoCo's own requirement).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxssl.losses import l2_normalize

__all__ = ["Queue", "init_queue", "enqueue", "check_queue_size"]


@flax.struct.dataclass
class Queue:
    keys: jax.Array  # float32 [K, D], L2-normalised rows
    ptr: jax.Array  # int32 []


def check_queue_size(size: int, keys_per_step: int) -> None:
    """ValueError unless the queue holds a whole number of steps' keys."""
    if keys_per_step <= 0 or size <= 0 or size % keys_per_step:
        fit = max(keys_per_step, size // max(keys_per_step, 1) * keys_per_step)
        raise ValueError(
            f"the queue size K ({size}) must be a positive multiple of the keys enqueued per step "
            f"({keys_per_step}: the global batch, twice it with the symmetric loss); try K={fit}")


def init_queue(key: jax.Array, size: int, dim: int) -> Queue:
    """K random unit vectors (MoCo's initialisation) and ptr 0."""
    if size <= 0 or dim <= 0:
        raise ValueError(f"queue size and dim must be positive; got {size} and {dim}")
    keys = l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))
    return Queue(keys=keys, ptr=jnp.zeros((), jnp.int32))


def enqueue(queue: Queue, keys: jax.Array) -> Queue:
    """Overwrite rows [ptr, ptr + N) with `keys` ([N, D], normalised here) and advance ptr.

    Inside shard_map pass the keys of the whole global batch (all_gather, tiled), so every
    device writes the same rows and the queue stays replicated.
    """
    n, size = keys.shape[0], queue.keys.shape[0]
    if size % n:
        raise ValueError(f"the queue size K ({size}) must be a multiple of the {n} keys enqueued "
                         "per step")
    keys = jax.lax.stop_gradient(l2_normalize(keys))
    new = jax.lax.dynamic_update_slice(queue.keys, keys, (queue.ptr, jnp.int32(0)))
    return Queue(keys=new, ptr=(queue.ptr + n) % size)
