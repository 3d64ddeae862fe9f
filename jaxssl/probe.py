"""The online linear probe: a classifier trained during pretraining on stop-gradient features.

It watches representation quality on every step at the cost of one [F, C] matrix multiply: a
linear layer on the backbone features the step has already computed (train-mode, augmented
views, as solo-learn's online classifier), with its own optimizer. Its gradient never reaches
the encoder (the features enter through stop_gradient) and it draws no randomness, so a run
with the probe trains the encoder exactly as a run without it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["ProbeState", "init_probe", "probe_update"]


@flax.struct.dataclass
class ProbeState:
    """params: {"kernel": [F, C] float32, "bias": [C] float32}; opt_state: the probe's optax
    state."""

    params: Any
    opt_state: Any


def init_probe(feature_dim: int, num_classes: int, tx: optax.GradientTransformation) -> ProbeState:
    """A zero classifier (uniform predictions; the softmax loss is convex, so zeros are a fine
    start) and a fresh optimizer state."""
    if feature_dim < 1 or num_classes < 2:
        raise ValueError(f"the online probe needs features and at least 2 classes; got "
                         f"feature_dim={feature_dim}, num_classes={num_classes}")
    params = {"kernel": jnp.zeros((feature_dim, num_classes), jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}
    return ProbeState(params=params, opt_state=tx.init(params))


def probe_update(probe: ProbeState, features: jax.Array, labels: jax.Array, *,
                 tx: optax.GradientTransformation, axis_name: str | None = None
                 ) -> tuple[ProbeState, dict[str, jax.Array]]:
    """One optimizer step of the probe on this device's rows.

    features: [n, F] (any float dtype; gradients are stopped here too), labels: int [n] in
    [0, C). Under shard_map (axis_name set) every device holds the same number of rows and the
    loss is the pmean of the per-device means: the gradient is that of the global mean loss.
    Returns (new probe, {"train/online_loss", "train/online_top1"}) measured before the update,
    float32 scalars equal on every device.
    """
    x = jax.lax.stop_gradient(features).astype(jnp.float32)

    def loss_fn(params):
        logits = jnp.dot(x, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        top1 = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        if axis_name is not None:
            # The global mean (equal rows per device). Differentiating it with respect to the
            # replicated params sums every device's part under shard_map, as in `info_nce`.
            loss, top1 = jax.lax.pmean((loss, top1), axis_name)
        return loss, top1

    (loss, top1), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe.params)
    updates, opt_state = tx.update(grads, probe.opt_state, probe.params)
    new = ProbeState(params=optax.apply_updates(probe.params, updates), opt_state=opt_state)
    return new, {"train/online_loss": loss, "train/online_top1": top1.astype(jnp.float32)}
