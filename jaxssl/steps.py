"""Pure train steps: (state, batch, key) -> (new_state, metrics).

No I/O, no jit, no config objects: bind the keyword-only dependencies once with
functools.partial and compile with `jaxssl.parallel.compile_step` (or your own jit/shard_map).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxssl import ema
from jaxssl.probe import probe_update
from jaxssl.losses import (info_nce_blockwise_with_accuracy, info_nce_with_accuracy,
                           moco_info_nce_with_accuracy)
from jaxssl.queue import enqueue
from jaxssl.state import TrainState

__all__ = ["simclr_step", "moco_step", "example_keys"]


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


def _unpack(batch):
    """(views or images, labels or None) of a step's batch: the bare views/images, or a dict
    with "views" or "images" and optionally "labels" (int32 [b]), as the pipeline yields."""
    if isinstance(batch, Mapping):
        return (batch["views"] if "views" in batch else batch["images"]), batch.get("labels")
    return batch, None


def _online_probe(state, features, labels, probe_tx, axis_name):
    """(state with the probe stepped, its metrics); nothing when no probe is configured."""
    if probe_tx is None:
        return state, {}
    if labels is None or state.probe is None or features is None:
        raise ValueError("the online probe (probe_tx) needs a state with a probe "
                         "(jaxssl.probe.init_probe), batches with \"labels\" and a model "
                         "whose outputs have \"features\"")
    probe, metrics = probe_update(state.probe, features, labels, tx=probe_tx,
                                  axis_name=axis_name)
    return state.replace(probe=probe), metrics


def _augment(views, key, step, augment_fn, axis_name):
    """views as they are, or augment_fn's (x1, x2) with one key per local example."""
    if augment_fn is None:
        return views
    b = jax.tree.leaves(views)[0].shape[0]
    return augment_fn(views, example_keys(key, step, b, axis_name))


def _global_norm(tree) -> jax.Array:
    """L2 norm of all leaves together, float32 []."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def simclr_step(
    state: TrainState,
    batch: Any,
    key: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    temperature: float,
    axis_name: str | None = None,
    average_batch_stats: bool = False,
    augment_fn: Callable | None = None,
    probe_tx: optax.GradientTransformation | None = None,
    loss_block_size: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SimCLR update.

    Args:
      state: TrainState (replicated when sharded).
      batch: (x1, x2), each [b, H, W, C] float: two augmented views of the same b images (the
        local shard of the global batch inside shard_map). With `augment_fn`, raw images
        [b, H, W, C] (any dtype augment_fn accepts) instead. Or a dict holding those as
        "views" (or "images") and the labels int32 [b] as "labels" (needed by probe_tx).
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
      probe_tx: the online probe's optimizer (`jaxssl.probe`): state.probe is trained on the
        stop-gradient backbone features of both views and the batch's labels. It does not
        change the encoder's update.
      loss_block_size: 0 computes the loss with `info_nce` (all [2b, 2N] logits at once); > 0
        with `info_nce_blockwise` in tiles of this side: the same loss and gradient in memory
        that does not grow with b x N, for global batches whose logits would not fit.

    Returns:
      (new_state, metrics) with float32 scalar metrics "train/loss",
      "train/contrastive_top1" and "train/grad_norm" (and the probe's "train/online_loss",
      "train/online_top1"), equal on every device.
    """
    views, labels = _unpack(batch)
    views = _augment(views, key, state.step, augment_fn, axis_name)
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
        if loss_block_size:
            loss, accuracy = info_nce_blockwise_with_accuracy(
                z[:b], z[b:], temperature=temperature, axis_name=axis_name,
                block_size=loss_block_size)
        else:
            loss, accuracy = info_nce_with_accuracy(
                z[:b], z[b:], temperature=temperature, axis_name=axis_name
            )
        return loss, (accuracy, new_batch_stats, outputs.get("features"))

    # The loss is already the global mean (pmean inside info_nce), so under shard_map the
    # gradient with respect to the replicated parameters is the global gradient.
    (loss, (accuracy, new_batch_stats, features)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    if axis_name is not None and average_batch_stats:
        new_batch_stats = jax.lax.pmean(new_batch_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state
    )
    # Rows [0, b) of the features are view 1 and [b, 2b) view 2 of the same b images.
    new_state, probe_metrics = _online_probe(
        new_state, features, None if labels is None else jnp.concatenate([labels, labels]),
        probe_tx, axis_name)
    metrics = {
        "train/loss": loss,
        "train/contrastive_top1": accuracy,
        "train/grad_norm": _global_norm(grads),
        **probe_metrics,
    }
    return new_state, metrics


def _key_forward(momentum_params, momentum_batch_stats, x, shuffle_key, *, apply_fn, shuffle_bn,
                 axis_name):
    """Keys of local images x [b, ...] from the momentum encoder, without gradient.

    Returns (k_local [b, D]: the keys of this device's rows, k_all [N, D]: the keys of the whole
    global batch in global order, new momentum batch stats). With shuffle_bn the global batch is
    permuted before the encoder and un-permuted after, so each device's BatchNorm statistics mix
    images from every device and cannot tell a query's key apart (MoCo's shuffle BN).
    """
    b = x.shape[0]
    x_all = x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)  # [N, ...]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    if shuffle_bn:
        perm = jax.random.permutation(shuffle_key, x_all.shape[0])
        # This device encodes rows [offset, offset + b) of the shuffled global batch.
        x_in = jax.lax.dynamic_slice_in_dim(x_all[perm], offset, b)
    else:
        x_in = x
    out, new_stats = apply_fn(momentum_params, momentum_batch_stats, x_in, train=True)
    k = jax.lax.stop_gradient(out["projection"])
    if axis_name is None:
        k_all = k
    else:
        # Gathered by a sum of zero-padded rows (exact: one non-zero term per row), so the
        # result is typed as replicated and the queue built from it can leave shard_map as P().
        n = x_all.shape[0]
        rows = jnp.zeros((n, k.shape[1]), k.dtype)
        k_all = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(rows, k, offset, 0), axis_name)
    if shuffle_bn:
        # Row i of k_all is the key of image perm[i]: put it back at perm[i].
        k_all = jnp.zeros_like(k_all).at[perm].set(k_all)
    k_local = jax.lax.dynamic_slice_in_dim(k_all, offset, b)
    return k_local, k_all, new_stats


def moco_step(
    state: TrainState,
    batch: Any,
    key: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    temperature: float,
    momentum_fn: Callable[[jax.Array], jax.Array],
    symmetric: bool = False,
    shuffle_bn: bool = False,
    axis_name: str | None = None,
    average_batch_stats: bool = False,
    augment_fn: Callable | None = None,
    probe_tx: optax.GradientTransformation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One MoCo (v2) update: queries from the trained encoder, keys from its EMA, a queue.

    Args:
      state: TrainState with momentum_params, momentum_batch_stats (the key encoder) and queue
        (`jaxssl.queue.Queue`, K a multiple of the keys enqueued per step).
      batch, key, apply_fn, tx, axis_name, augment_fn, probe_tx: as for `simclr_step`. x1
        gives the queries, x2 their keys (and the reverse too when symmetric); the online
        probe sees the query encoder's features of the query views.
      temperature: InfoNCE temperature.
      momentum_fn: step -> EMA momentum m (`jaxssl.ema.constant_momentum(0.99)`, ...).
      symmetric: both views serve as queries (MoCo's CIFAR demo): the loss is the sum of the
        two directions and the keys of both views are enqueued, 2N per step.
      shuffle_bn: permute the global batch before the key encoder (see `_key_forward`). For one
        device, use it with `models.split_bn_apply_fn(apply_fn, G)`: the same permutation then
        gives the same result as G devices with per-device BN.
      average_batch_stats: with per-device BN, average both encoders' running statistics over
        axis_name after the step.

    Order: keys from the current key encoder; loss and gradient for the query encoder; the
    optimizer step; then the key encoder's EMA towards the new parameters and the new keys into
    the queue (the same sequence as MoCo, which updates the key encoder at the start of the
    next step). Returns (new_state, metrics): "train/loss", "train/contrastive_top1" (the
    positive key outscores every queued one), "train/grad_norm", "train/ema_momentum".
    """
    views, labels = _unpack(batch)
    views = _augment(views, key, state.step, augment_fn, axis_name)
    x1, x2 = views
    # The shuffle permutations are drawn from the step's key by split, apart from the
    # per-example keys (fold_in of the step key with each example's position).
    shuffle_keys = jax.random.split(jax.random.split(jax.random.fold_in(key, state.step))[0], 2)
    forward_k = functools.partial(_key_forward, apply_fn=apply_fn, shuffle_bn=shuffle_bn,
                                  axis_name=axis_name)
    k2, k2_all, momentum_stats = forward_k(state.momentum_params, state.momentum_batch_stats, x2,
                                           shuffle_keys[0])
    if symmetric:
        k1, k1_all, momentum_stats = forward_k(state.momentum_params, momentum_stats, x1,
                                               shuffle_keys[1])
    negatives = state.queue.keys

    def loss_fn(params):
        out1, stats = apply_fn(params, state.batch_stats, x1, train=True)
        loss, acc = moco_info_nce_with_accuracy(out1["projection"], k2, negatives,
                                                temperature=temperature, axis_name=axis_name)
        features = out1.get("features")
        if symmetric:
            out2, stats = apply_fn(params, stats, x2, train=True)
            loss2, acc2 = moco_info_nce_with_accuracy(out2["projection"], k1, negatives,
                                                      temperature=temperature,
                                                      axis_name=axis_name)
            loss, acc = loss + loss2, (acc + acc2) / 2
            if features is not None:
                features = jnp.concatenate([features, out2["features"]])
        return loss, (acc, stats, features)

    (loss, (accuracy, new_stats, features)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    if axis_name is not None and average_batch_stats:
        new_stats = jax.lax.pmean(new_stats, axis_name)
        momentum_stats = jax.lax.pmean(momentum_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = momentum_fn(state.step)
    new_keys = jnp.concatenate([k1_all, k2_all]) if symmetric else k2_all
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state,
        momentum_params=ema.ema_update(state.momentum_params, params, m),
        momentum_batch_stats=momentum_stats,
        queue=enqueue(state.queue, new_keys),
    )
    if labels is not None and symmetric:
        labels = jnp.concatenate([labels, labels])  # the features of x1, then of x2
    new_state, probe_metrics = _online_probe(new_state, features, labels, probe_tx, axis_name)
    metrics = {
        "train/loss": loss,
        "train/contrastive_top1": accuracy,
        "train/grad_norm": _global_norm(grads),
        "train/ema_momentum": jnp.asarray(m, jnp.float32),
        **probe_metrics,
    }
    return new_state, metrics
