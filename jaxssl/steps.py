"""Pure train steps: (state, batch, key) -> (new_state, metrics).

No I/O, no jit, no config objects: bind the keyword-only dependencies once with
functools.partial and compile with `jaxssl.parallel.compile_step` (or your own jit/shard_map).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxssl.losses import info_nce_with_accuracy
from jaxssl.state import TrainState

__all__ = ["simclr_step", "example_keys"]


def example_keys(key: jax.Array, step: jax.Array, batch_size: int,
                 axis_name: str | None = None) -> jax.Array:
    """One key per local example: fold_in(fold_in(key, step), global example position).

    batch_size is the local batch; under shard_map the global position of local row i is
    axis_index * batch_size + i, so the keys, and hence the augmentations, depend only on the
    root key, the step and the example's place in the global batch, not on how many devices
    share it. Nothing random lives on the host between steps, so a resumed run draws the same
    numbers. Returns [batch_size] keys.
    """
    step_key = jax.random.fold_in(key, step)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
    positions = offset + jnp.arange(batch_size, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, positions)


def _global_norm(tree) -> jax.Array:
    """L2 norm of all leaves together, float32 []."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def simclr_step(
    state: TrainState,
    views: Any,
    key: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    temperature: float,
    axis_name: str | None = None,
    average_batch_stats: bool = False,
    augment_fn: Callable | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SimCLR update.

    Args:
      state: TrainState (replicated when sharded).
      views: (x1, x2), each [b, H, W, C] float: two augmented views of the same b images (the
        local shard of the global batch inside shard_map). With `augment_fn`, raw images
        [b, H, W, C] (any dtype augment_fn accepts) instead.
      key: root PRNG key; each example's key is derived from it, the step and the example's
        global position (`example_keys`).
      apply_fn: `apply_fn(params, batch_stats, images, *, train) -> (outputs, new_batch_stats)`,
        outputs["projection"]: [N, D]; see `jaxssl.models.flax_apply_fn`.
      tx: optax transformation; its state is state.opt_state.
      temperature: InfoNCE temperature (> 0).
      axis_name: mesh axis of the data when run under shard_map; the loss then contrasts against
        the whole global batch and the gradient is the global one.
      average_batch_stats: with per-device BatchNorm (BN_MODES["local"]), average the new
        running statistics over axis_name so the state stays identical on all devices. Leave
        False for global BN, whose statistics are already identical.
      augment_fn: optional `augment_fn(batch, keys) -> (x1, x2)` run on the device, keys [b]
        one per local example (e.g. `jaxssl.data.augment_jax.make_device_augment`).

    Returns:
      (new_state, metrics) with float32 scalar metrics "train/loss",
      "train/contrastive_top1" and "train/grad_norm", equal on every device.
    """
    if augment_fn is not None:
        b = jax.tree.leaves(views)[0].shape[0]
        views = augment_fn(views, example_keys(key, state.step, b, axis_name))
    x1, x2 = views
    if x1.shape != x2.shape:
        raise ValueError(f"the two views must have the same shape; got {x1.shape} and {x2.shape}")
    b = x1.shape[0]

    def loss_fn(params):
        # Both views go through the encoder as one batch, so BatchNorm statistics are
        # computed over all 2b views together (as SimCLR does).
        outputs, new_batch_stats = apply_fn(
            params, state.batch_stats, jnp.concatenate([x1, x2], axis=0), train=True
        )
        z = outputs["projection"]
        loss, accuracy = info_nce_with_accuracy(
            z[:b], z[b:], temperature=temperature, axis_name=axis_name
        )
        return loss, (accuracy, new_batch_stats)

    # The loss is already the global mean (pmean inside info_nce), so under shard_map the
    # gradient with respect to the replicated parameters is the global gradient.
    (loss, (accuracy, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    if axis_name is not None and average_batch_stats:
        new_batch_stats = jax.lax.pmean(new_batch_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state
    )
    metrics = {
        "train/loss": loss,
        "train/contrastive_top1": accuracy,
        "train/grad_norm": _global_norm(grads),
    }
    return new_state, metrics
