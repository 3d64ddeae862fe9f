"""The train-state pytree shared by every method.

A flax.struct dataclass: every field is a pytree leaf or subtree, so the whole state can be
jitted, sharded, donated and checkpointed by orbax as one object. What only one method keeps
(MoCo's momentum encoder and queue, BYOL's target network) lives in `method_state`, a pytree
the method defines (`jaxssl.methods`); the other fields are the same for every method.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "create_train_state", "momentum_encoder", "LegacyTrainState",
           "LEGACY_FIELDS", "to_legacy", "from_legacy"]


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params, batch_stats: the online encoder (+ head, + predictor);
    opt_state: optax's.

    method_state: the method's own pytree, or None (SimCLR, SimSiam, Barlow Twins, VICReg have
      none; MoCo, BYOL and MoCo v3 a dict with "momentum_params" and "momentum_batch_stats",
      the EMA encoder, and MoCo also "queue", a `jaxssl.queue.Queue`).
    probe: the online linear probe (`jaxssl.probe.ProbeState`), or None.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    method_state: Any = None
    probe: Any = None

    # Read-only, as before the methods package, where these were fields: the EMA encoder and
    # MoCo's queue in method_state (None when the method has none). Change them with
    # replace(method_state={...}).
    @property
    def momentum_params(self) -> Any:
        return (self.method_state or {}).get("momentum_params")

    @property
    def momentum_batch_stats(self) -> Any:
        return (self.method_state or {}).get("momentum_batch_stats")

    @property
    def queue(self) -> Any:
        return (self.method_state or {}).get("queue")


def _copy(tree):
    return jax.tree.map(jnp.array, tree)  # distinct buffers, so both trees can be donated


def momentum_encoder(params: Any, batch_stats: Any, **more) -> dict[str, Any]:
    """The method_state of a method with an EMA encoder: a copy of the online encoder (and
    `more` entries, e.g. queue=...)."""
    return {"momentum_params": _copy(params), "momentum_batch_stats": _copy(batch_stats), **more}


def create_train_state(
    params: Any,
    batch_stats: Any,
    tx: optax.GradientTransformation,
    *,
    with_momentum_encoder: bool = False,
    queue: Any = None,
    probe: Any = None,
    method_state: Any = None,
) -> TrainState:
    """A state at step 0 with a fresh optimizer state, an online probe (`jaxssl.probe.init_probe`)
    when given, and the method's state: `method_state` as given, or, for MoCo as before the
    methods package, `with_momentum_encoder` (a copy of the encoder as its EMA) and MoCo's
    `queue` (`jaxssl.queue.init_queue`)."""
    if method_state is None and (with_momentum_encoder or queue is not None):
        method_state = momentum_encoder(params, batch_stats,
                                        **({} if queue is None else {"queue": queue}))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        method_state=method_state,
        probe=probe,
    )


@flax.struct.dataclass
class LegacyTrainState:
    """The layout checkpoints had before `jaxssl.methods` (jaxssl up to 2026-12-01): MoCo's
    momentum encoder and queue were fields of the state. Read only, to convert old checkpoints
    (`to_legacy`, `from_legacy`)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    momentum_params: Any = None
    momentum_batch_stats: Any = None
    queue: Any = None
    probe: Any = None


LEGACY_FIELDS = ("momentum_params", "momentum_batch_stats", "queue")


def to_legacy(state: TrainState) -> LegacyTrainState | None:
    """The old layout of `state` (a template to restore an old checkpoint into), or None when
    the state has method-owned parts the old layout had no place for."""
    ms = state.method_state
    if ms is not None and not (isinstance(ms, dict) and set(ms) <= set(LEGACY_FIELDS)):
        return None
    ms = ms or {}
    return LegacyTrainState(state.step, state.params, state.batch_stats, state.opt_state,
                            **{k: ms.get(k) for k in LEGACY_FIELDS}, probe=state.probe)


def from_legacy(old: LegacyTrainState, like: TrainState) -> TrainState:
    """A TrainState of `like`'s layout holding the values of an old-layout state."""
    ms = None
    if like.method_state is not None:
        ms = {k: getattr(old, k) for k in like.method_state}
    return TrainState(old.step, old.params, old.batch_stats, old.opt_state, ms, old.probe)
