"""MoCo v2 (Chen et al. 2020): queries from the trained encoder, keys from its EMA (the
momentum encoder), negatives from a queue of past keys; shuffle BN; fields under `moco`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxssl import ema
from jaxssl.losses import moco_info_nce_with_accuracy
from jaxssl.methods import base
from jaxssl.queue import enqueue

__all__ = ["moco_step", "METHOD"]


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
    state,
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
) -> tuple[Any, dict[str, jax.Array]]:
    """One MoCo (v2) update: queries from the trained encoder, keys from its EMA, a queue.

    Args:
      state: TrainState whose method_state is {"momentum_params", "momentum_batch_stats"} (the
        key encoder) and "queue" (`jaxssl.queue.Queue`, K a multiple of the keys enqueued per
        step): `init_state`, or `jaxssl.state.create_train_state(..., with_momentum_encoder=
        True, queue=...)`.
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
    positive key outscores every queued one), "train/grad_norm", "train/ema_momentum",
    "train/alignment" and "train/uniformity" (of the queries and their positive keys).
    """
    x1, x2, labels = base.views_and_labels(batch, key, state.step, augment_fn, axis_name)
    # The shuffle permutations are drawn from the step's key by split, apart from the
    # per-example keys (fold_in of the step key with each example's position).
    shuffle_keys = jax.random.split(jax.random.split(jax.random.fold_in(key, state.step))[0], 2)
    forward_k = functools.partial(_key_forward, apply_fn=apply_fn, shuffle_bn=shuffle_bn,
                                  axis_name=axis_name)
    ms = state.method_state
    k2, k2_all, momentum_stats = forward_k(ms["momentum_params"], ms["momentum_batch_stats"], x2,
                                           shuffle_keys[0])
    if symmetric:
        k1, k1_all, momentum_stats = forward_k(ms["momentum_params"], momentum_stats, x1,
                                               shuffle_keys[1])
    negatives = ms["queue"].keys

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
        return loss, (acc, stats, features, out1["projection"])

    (loss, (accuracy, new_stats, features, q)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = base.apply_gradients(state, grads, new_stats, tx=tx, axis_name=axis_name,
                                     average_batch_stats=average_batch_stats)
    m = momentum_fn(state.step)
    new_keys = jnp.concatenate([k1_all, k2_all]) if symmetric else k2_all
    new_state = new_state.replace(method_state=base.momentum_update(
        {**ms, "queue": enqueue(ms["queue"], new_keys)}, new_state.params, momentum_stats, m,
        axis_name, average_batch_stats))
    if labels is not None and symmetric:
        labels = jnp.concatenate([labels, labels])  # the features of x1, then of x2
    align, uniform = base.alignment_uniformity(q, k2, axis_name=axis_name)
    metrics = {"train/loss": loss, "train/contrastive_top1": accuracy,
               "train/ema_momentum": jnp.asarray(m, jnp.float32),
               "train/alignment": align, "train/uniformity": uniform}
    return base.finish(new_state, metrics, grads, features=features, labels=labels,
                       probe_tx=probe_tx, axis_name=axis_name)


def config_group() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.queue_size = 4096  # K: a multiple of the keys enqueued per step
    g.momentum = 0.99  # the key encoder's EMA momentum (at the start, for "cosine")
    g.momentum_schedule = "constant"  # or "cosine" (to 1 at the end)
    g.symmetric = False  # both views as queries; enqueues 2 x batch keys per step
    g.shuffle_bn = True  # shuffle the batch across BN groups before the key encoder
    g.bn_groups = 0  # with model.bn "local": BN groups over the global batch (0 = one per
    #                  device); 8 on one device is MoCo's split BN
    return g


def validate(config) -> None:
    from jaxssl.configuration import _check, _choice

    g = config.moco
    _choice("moco.momentum_schedule", g.momentum_schedule, ema.MOMENTUM_SCHEDULES)
    _check(0.0 <= g.momentum <= 1.0, f"moco.momentum must lie in [0, 1] (MoCo uses "
                                     f"0.99-0.999); got {g.momentum}")
    _check(g.queue_size > 0, f"moco.queue_size must be positive; got {g.queue_size}")
    _check(g.bn_groups >= 0, "moco.bn_groups must be >= 0")


def init_state(exp, params, batch_stats):
    from jaxssl import queue as queue_lib, state as state_lib

    config = exp.config
    queue = queue_lib.init_queue(jax.random.fold_in(jax.random.key(config.seed), 2),
                                 config.moco.queue_size, config.model.out_dim)
    return state_lib.momentum_encoder(params, batch_stats, queue=queue)


def bind(exp) -> Callable:
    """moco_step bound to the config; ConfigError for what cannot run."""
    from jaxssl import models, parallel, queue as queue_lib
    from jaxssl.configuration import ConfigError

    config, mc = exp.config, exp.config.moco
    n_dev = exp.mesh.shape[parallel.DATA_AXIS]
    keys_per_step = config.batch_size * (2 if mc.symmetric else 1)
    try:
        queue_lib.check_queue_size(mc.queue_size, keys_per_step)
    except ValueError as e:
        raise ConfigError(str(e).replace("queue size K", "moco.queue_size")) from e
    groups = 1
    if config.model.bn == "local" and mc.bn_groups:
        # bn_groups counts groups over the global batch: per device, bn_groups / devices.
        if mc.bn_groups % n_dev or (config.batch_size // n_dev) % (mc.bn_groups // n_dev):
            raise ConfigError(
                f"moco.bn_groups {mc.bn_groups} does not split over {n_dev} devices with "
                f"{config.batch_size // n_dev} images each; use a multiple of {n_dev} that "
                "divides the batch")
        groups = mc.bn_groups // n_dev
    return functools.partial(
        moco_step, apply_fn=models.split_bn_apply_fn(exp.apply_fn, groups), tx=exp.tx,
        temperature=config.loss.temperature,
        momentum_fn=base.momentum_fn(mc.momentum, mc.momentum_schedule, exp.total_steps),
        symmetric=mc.symmetric, shuffle_bn=mc.shuffle_bn,
        average_batch_stats=parallel.BN_MODES[config.model.bn].average_batch_stats,
        augment_fn=exp.augment_fn, probe_tx=exp.probe_tx)


METHOD = base.Method(name="moco", title="MoCo v2", step=moco_step, bind=bind,
                     init_state=init_state, config_group=config_group, validate=validate,
                     contrastive=True)
