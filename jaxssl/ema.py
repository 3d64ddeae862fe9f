"""The momentum (EMA) encoder: an exponential moving average of the online parameter pytree.

    target <- m * target + (1 - m) * online

MoCo keeps m constant (0.999 on ImageNet, 0.99 on CIFAR); BYOL and MoCo v3 raise it from a
base value to 1 along a cosine over training. Schedules are step -> m functions, like optax's
learning-rate schedules, so they can be evaluated inside a jitted step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["ema_update", "constant_momentum", "cosine_momentum", "MOMENTUM_SCHEDULES",
           "check_momentum"]


def check_momentum(momentum: float) -> None:
    """ValueError unless 0 <= momentum <= 1 (a Python number; traced values are not checked)."""
    if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"the EMA momentum must lie in [0, 1] (MoCo uses 0.99-0.999); got "
                         f"{momentum}")


def ema_update(target: Any, online: Any, momentum: float | jax.Array) -> Any:
    """m * target + (1 - m) * online, leaf by leaf, in each target leaf's dtype.

    target, online: pytrees of the same structure (e.g. momentum_params and params);
    momentum: a float or float32 [] (a schedule's value at this step). m = 1 freezes the target,
    m = 0 copies the online tree.
    """
    check_momentum(momentum)
    m = jnp.asarray(momentum, jnp.float32)

    def one(t, o):
        # In float32 at least, so a bfloat16 target does not round every small update away.
        t32 = t.astype(jnp.promote_types(t.dtype, jnp.float32))
        return (m * t32 + (1.0 - m) * o.astype(t32.dtype)).astype(t.dtype)

    return jax.tree.map(one, target, online)


def constant_momentum(base: float) -> Callable[[Any], jax.Array]:
    """step -> base (MoCo v1/v2)."""
    check_momentum(base)
    return lambda step: jnp.full((), base, jnp.float32)


def cosine_momentum(base: float, total_steps: int) -> Callable[[Any], jax.Array]:
    """step -> 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2 (BYOL): base at step 0,
    1 at total_steps and after."""
    check_momentum(base)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")

    def schedule(step):
        progress = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
        return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0

    return schedule


MOMENTUM_SCHEDULES = {"constant": constant_momentum, "cosine": cosine_momentum}
