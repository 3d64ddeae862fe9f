"""The train-state pytree shared by every step.

A flax.struct dataclass: every field is a pytree leaf or subtree, so the whole state can be
jitted, sharded, donated and checkpointed by orbax as one object. Fields a method does not use
are None (an empty subtree), so SimCLR and MoCo states have the same type.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params, batch_stats: the online encoder (+ head); opt_state: optax's.

    momentum_params, momentum_batch_stats: the EMA (momentum / key) encoder, or None.
    queue: MoCo's queue of negatives, or None.
    probe: the online linear probe (`jaxssl.probe.ProbeState`), or None.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    momentum_params: Any = None
    momentum_batch_stats: Any = None
    queue: Any = None
    probe: Any = None


def create_train_state(
    params: Any,
    batch_stats: Any,
    tx: optax.GradientTransformation,
    *,
    with_momentum_encoder: bool = False,
    queue: Any = None,
    probe: Any = None,
) -> TrainState:
    """A state at step 0 with a fresh optimizer state (and a copy of the encoder as its EMA, and
    MoCo's queue, `jaxssl.queue.init_queue`, and an online probe, `jaxssl.probe.init_probe`,
    when given)."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (distinct buffers, donatable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        momentum_params=copy(params) if with_momentum_encoder else None,
        momentum_batch_stats=copy(batch_stats) if with_momentum_encoder else None,
        queue=queue,
        probe=probe,
    )
